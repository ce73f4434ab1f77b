// Checks of the built client (dist/) that need no broker: TLS credentials, and the
// status-detail decoding, error mapping and retry loop against an in-process fake
// TokenBrokerService (grpc-js on a loopback port) that answers what each check plans.
//
//   node test/unit.mjs
//
// One line per passed check; the first failure exits 1 with what went wrong.
import assert from "node:assert/strict";
import { dirname, join } from "node:path";

import grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

import {
  AccessToken,
  BrokerClient,
  BrokerError,
  BrokerUnavailable,
  ConnectionNotFound,
  DEFAULT_PROTO_PATH,
  InvalidRequest,
  PermissionDenied,
  ReauthorizationRequired,
} from "../dist/index.js";

let passed = 0;

async function check(name, body) {
  try {
    await body();
  } catch (error) {
    console.error(`FAIL: ${name}\n${error instanceof Error ? error.stack : String(error)}`);
    process.exit(1);
  }
  passed += 1;
  console.log(`ok ${passed} - ${name}`);
}

async function rejection(promise, type) {
  let thrown;
  try {
    await promise;
  } catch (error) {
    thrown = error;
  }
  assert.ok(thrown !== undefined, `expected ${type.name}, but the call succeeded`);
  assert.ok(
    thrown instanceof type,
    `expected ${type.name}, got ${thrown?.name}: ${thrown?.message}`,
  );
  return thrown;
}

// --- google.rpc.Status details, built the way the broker sends them ---------------------

const protosDir = join(dirname(DEFAULT_PROTO_PATH), "..", "..", "..");
const rpc = new protobuf.Root().loadSync(
  [join(protosDir, "google/rpc/status.proto"), join(protosDir, "google/rpc/error_details.proto")],
  { keepCase: true },
);
const types = Object.fromEntries(
  ["Status", "ErrorInfo", "RetryInfo", "BadRequest"].map((n) => [
    n,
    rpc.lookupType(`google.rpc.${n}`),
  ]),
);

function packed(name, fields) {
  const type = types[name];
  return {
    type_url: `type.googleapis.com/google.rpc.${name}`,
    value: type.encode(type.fromObject(fields)).finish(),
  };
}

/** A grpc-js server error carrying grpc-status-details-bin, as the broker answers. */
function failure(code, message, details = []) {
  const metadata = new grpc.Metadata();
  const status = types.Status.encode(types.Status.fromObject({ code, message, details })).finish();
  metadata.set("grpc-status-details-bin", Buffer.from(status));
  return { code, details: message, metadata };
}

const errorInfo = (reason, metadata = {}, domain = "qbo-broker") =>
  packed("ErrorInfo", { reason, domain, metadata });
const retryInfo = (ms) =>
  packed("RetryInfo", {
    retry_delay: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 },
  });

// --- the fake TokenBrokerService ------------------------------------------------------

const plans = new Map(); // realmId/userId -> array of answers (last one repeats)
const received = [];

const definition = protoLoader.loadSync(DEFAULT_PROTO_PATH, {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: false,
  oneofs: true,
});
const server = new grpc.Server();
server.addService(definition["qbo.broker.v1.TokenBrokerService"], {
  GetAccessToken(call, callback) {
    const key = call.request.realmId ?? call.request.userId;
    received.push({ key, request: call.request, at: performance.now() });
    const plan = plans.get(key) ?? [];
    const answer = plan.length > 1 ? plan.shift() : plan[0];
    if (answer === undefined) {
      callback(failure(grpc.status.NOT_FOUND, `no plan for ${key}`));
    } else if (answer === "hang") {
      // never answer: the client's deadline ends the call
    } else if (answer.error) {
      callback(answer.error);
    } else {
      callback(null, answer.reply);
    }
  },
});
const port = await new Promise((resolve, reject) => {
  server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
    error ? reject(error) : resolve(bound),
  );
});
const address = `127.0.0.1:${port}`;

const SECRET = "eyJ-the-access-token-never-printed";
const goodReply = (realmId) => ({
  accessToken: SECRET,
  expiresAt: { seconds: 4102444800, nanos: 250_000_000 }, // 2100-01-01T00:00:00.250Z
  realmId,
  refreshTokenExpiresAt: { seconds: 4111171200 }, // 2100-04-12
});

function callsFor(key) {
  return received.filter((r) => r.key === key);
}

try {
  await check("mutual TLS options build SSL credentials from the given buffers", () => {
    const rootCert = Buffer.from("root");
    const privateKey = Buffer.from("key");
    const certChain = Buffer.from("chain");
    const original = grpc.credentials.createSsl;
    const calls = [];
    grpc.credentials.createSsl = (...args) => {
      calls.push(args);
      return grpc.credentials.createInsecure();
    };
    try {
      new BrokerClient(address, { credentials: { rootCert, privateKey, certChain } }).close();
      new BrokerClient(address, { credentials: { rootCert } }).close();
      new BrokerClient(address).close();
      assert.throws(
        () => new BrokerClient(address, { credentials: { rootCert, privateKey } }),
        TypeError,
        "a private key without its certificate chain must be refused",
      );
    } finally {
      grpc.credentials.createSsl = original;
    }
    assert.equal(calls.length, 2, "createSsl calls (mTLS, server-only TLS; none for plaintext)");
    assert.ok(calls[0][0] === rootCert && calls[0][1] === privateKey && calls[0][2] === certChain);
    assert.deepEqual(calls[1], [rootCert, null, null]);
  });

  const client = new BrokerClient(address, { timeoutMs: 2_000 });

  await check("the request carries the realm or user and min_validity as a Duration", async () => {
    plans.set("r-ok", [{ reply: goodReply("r-ok") }]);
    plans.set("u-ok", [{ reply: goodReply("r-ok") }]);
    await client.getAccessToken({ realmId: "r-ok" }, { minValiditySeconds: 1200.5 });
    await client.getAccessToken({ userId: "u-ok" });
    const [byRealm] = callsFor("r-ok");
    const [byUser] = callsFor("u-ok");
    assert.equal(byRealm.request.realmId, "r-ok");
    assert.equal(byRealm.request.userId, undefined);
    assert.deepEqual(byRealm.request.minValidity, { seconds: 1200, nanos: 500_000_000 });
    assert.equal(byUser.request.userId, "u-ok");
    assert.equal(byUser.request.minValidity, undefined, "unset means the broker's default");
  });

  await check(
    "the answer becomes an AccessToken with Dates; unset dates are undefined",
    async () => {
      const token = await client.getAccessToken({ realmId: "r-ok" });
      assert.ok(token instanceof AccessToken);
      assert.equal(token.accessToken, SECRET);
      assert.equal(token.expiresAt.toISOString(), "2100-01-01T00:00:00.250Z");
      assert.equal(token.refreshTokenExpiresAt.toISOString(), "2100-04-12T00:00:00.000Z");
      assert.equal(token.reconnectDeadline, undefined);
      for (const shown of [JSON.stringify(token), String(token), `${token}`]) {
        assert.ok(!shown.includes(SECRET), shown);
      }
    },
  );

  await check("REAUTHORIZATION_REQUIRED reads realm_id and detail from ErrorInfo", async () => {
    plans.set("r-reauth", [
      {
        error: failure(
          grpc.status.FAILED_PRECONDITION,
          "realm r-9 needs the customer to reconnect",
          [errorInfo("REAUTHORIZATION_REQUIRED", { realm_id: "r-9", detail: "invalid_grant" })],
        ),
      },
    ]);
    const error = await rejection(
      client.getAccessToken({ realmId: "r-reauth" }),
      ReauthorizationRequired,
    );
    assert.equal(error.realmId, "r-9");
    assert.equal(error.detail, "invalid_grant");
    assert.equal(error.code, "FAILED_PRECONDITION");
    assert.equal(error.reason, "REAUTHORIZATION_REQUIRED");
    assert.equal(error.name, "ReauthorizationRequired");
  });

  await check("an ErrorInfo of another domain is not the broker's reason", async () => {
    plans.set("r-foreign", [
      {
        error: failure(grpc.status.FAILED_PRECONDITION, "someone else's", [
          errorInfo("REAUTHORIZATION_REQUIRED", { realm_id: "x" }, "example.com"),
        ]),
      },
    ]);
    const error = await rejection(client.getAccessToken({ realmId: "r-foreign" }), BrokerError);
    assert.ok(!(error instanceof ReauthorizationRequired));
    assert.equal(error.reason, undefined);
    assert.equal(error.code, "FAILED_PRECONDITION");
  });

  await check(
    "AMBIGUOUS_USER and INTUIT_CLIENT_REJECTED are BrokerErrors with their reason",
    async () => {
      plans.set("u-ambiguous", [
        {
          error: failure(grpc.status.FAILED_PRECONDITION, "several", [errorInfo("AMBIGUOUS_USER")]),
        },
      ]);
      plans.set("r-client", [
        { error: failure(grpc.status.INTERNAL, "rejected", [errorInfo("INTUIT_CLIENT_REJECTED")]) },
      ]);
      const ambiguous = await rejection(
        client.getAccessToken({ userId: "u-ambiguous" }),
        BrokerError,
      );
      assert.equal(ambiguous.constructor, BrokerError);
      assert.equal(ambiguous.reason, "AMBIGUOUS_USER");
      const rejected = await rejection(client.getAccessToken({ realmId: "r-client" }), BrokerError);
      assert.equal(rejected.code, "INTERNAL");
      assert.equal(rejected.reason, "INTUIT_CLIENT_REJECTED");
    },
  );

  await check("NOT_FOUND, PERMISSION_DENIED and BadRequest map to their classes", async () => {
    plans.set("r-denied", [{ error: failure(grpc.status.PERMISSION_DENIED, "policy says no") }]);
    plans.set("r-bad", [
      {
        error: failure(grpc.status.INVALID_ARGUMENT, "min_validity: too long", [
          packed("BadRequest", {
            field_violations: [{ field: "min_validity", description: "too long" }],
          }),
        ]),
      },
    ]);
    plans.set("r-bare-bad", [{ error: { code: grpc.status.INVALID_ARGUMENT, details: "bad" } }]);
    await rejection(client.getAccessToken({ realmId: "r-missing" }), ConnectionNotFound);
    const denied = await rejection(
      client.getAccessToken({ realmId: "r-denied" }),
      PermissionDenied,
    );
    assert.equal(denied.code, "PERMISSION_DENIED");
    const bad = await rejection(client.getAccessToken({ realmId: "r-bad" }), InvalidRequest);
    assert.equal(bad.field, "min_validity");
    assert.deepEqual(bad.violations, [{ field: "min_validity", description: "too long" }]);
    const bare = await rejection(client.getAccessToken({ realmId: "r-bare-bad" }), InvalidRequest);
    assert.equal(bare.field, "request");
  });

  await check(
    "UNAVAILABLE with RetryInfo is retried after the delay, within the timeout",
    async () => {
      plans.set("r-retry", [
        {
          error: failure(grpc.status.UNAVAILABLE, "Intuit is unavailable", [
            errorInfo("INTUIT_UNAVAILABLE", { intuit_tid: "tid-1" }),
            retryInfo(300),
          ]),
        },
        { reply: goodReply("r-retry") },
      ]);
      const token = await client.getAccessToken({ realmId: "r-retry" });
      assert.equal(token.realmId, "r-retry");
      const calls = callsFor("r-retry");
      assert.equal(calls.length, 2);
      const waited = calls[1].at - calls[0].at;
      assert.ok(
        waited >= 290 && waited < 1_500,
        `waited ${Math.round(waited)} ms for a 300 ms delay`,
      );
    },
  );

  await check(
    "a delay beyond the timeout is thrown at once, with retryAfterMs and metadata",
    async () => {
      plans.set("r-later", [
        {
          error: failure(grpc.status.UNAVAILABLE, "Intuit is unavailable", [
            errorInfo("INTUIT_UNAVAILABLE", { intuit_tid: "tid-2" }),
            retryInfo(30_500),
          ]),
        },
      ]);
      const started = performance.now();
      const error = await rejection(
        client.getAccessToken({ realmId: "r-later" }),
        BrokerUnavailable,
      );
      assert.ok(performance.now() - started < 1_000, "it slept instead of giving up");
      assert.equal(error.retryAfterMs, 30_500);
      assert.equal(error.reason, "INTUIT_UNAVAILABLE");
      assert.equal(error.metadata.intuit_tid, "tid-2");
      assert.equal(callsFor("r-later").length, 1);
    },
  );

  await check(
    "repeated delays are retried until the timeout, then the last error is thrown",
    async () => {
      plans.set("r-pending", [
        {
          error: failure(grpc.status.UNAVAILABLE, "refresh pending", [
            errorInfo("REFRESH_PENDING"),
            retryInfo(400),
          ]),
        },
      ]);
      const impatient = new BrokerClient(address, { timeoutMs: 1_000 });
      const started = performance.now();
      try {
        const error = await rejection(
          impatient.getAccessToken({ realmId: "r-pending" }),
          BrokerUnavailable,
        );
        assert.equal(error.reason, "REFRESH_PENDING");
      } finally {
        impatient.close();
      }
      const elapsed = performance.now() - started;
      assert.ok(elapsed < 1_500, `took ${Math.round(elapsed)} ms with a 1 s timeout`);
      // Calls at about 0, 400 and 800 ms; the next would pass 1 s (2 on a very busy machine).
      const calls = callsFor("r-pending").length;
      assert.ok(calls >= 2 && calls <= 3, `${calls} calls`);
    },
  );

  await check(
    "UNAVAILABLE without RetryInfo, or with a garbled trailer, is thrown at once",
    async () => {
      plans.set("r-storage", [
        {
          error: failure(grpc.status.UNAVAILABLE, "database down", [
            errorInfo("STORAGE_UNAVAILABLE"),
          ]),
        },
      ]);
      const garbled = new grpc.Metadata();
      garbled.set("grpc-status-details-bin", Buffer.from([0xff, 0xff, 0xff, 0x01]));
      plans.set("r-garbled", [
        { error: { code: grpc.status.UNAVAILABLE, details: "x", metadata: garbled } },
      ]);
      const storage = await rejection(
        client.getAccessToken({ realmId: "r-storage" }),
        BrokerUnavailable,
      );
      assert.equal(storage.reason, "STORAGE_UNAVAILABLE");
      assert.equal(storage.retryAfterMs, undefined);
      const bad = await rejection(
        client.getAccessToken({ realmId: "r-garbled" }),
        BrokerUnavailable,
      );
      assert.equal(bad.reason, undefined);
      assert.equal(callsFor("r-storage").length + callsFor("r-garbled").length, 2);
    },
  );

  await check(
    "the call's timeout ends a hung call as BrokerUnavailable (DEADLINE_EXCEEDED)",
    async () => {
      plans.set("r-hang", ["hang"]);
      const quick = new BrokerClient(address, { timeoutMs: 300 });
      const started = performance.now();
      try {
        const error = await rejection(
          quick.getAccessToken({ realmId: "r-hang" }),
          BrokerUnavailable,
        );
        assert.equal(error.code, "DEADLINE_EXCEEDED");
      } finally {
        quick.close();
      }
      assert.ok(performance.now() - started < 1_500);
    },
  );

  await check("bad arguments are refused before any call", async () => {
    const before = received.length;
    for (const connection of [{}, { realmId: "a", userId: "b" }, { realmId: 7 }, undefined]) {
      const error = await rejection(client.getAccessToken(connection), InvalidRequest);
      assert.equal(error.field, "connection");
    }
    const nan = await rejection(
      client.getAccessToken({ realmId: "r-ok" }, { minValiditySeconds: Number.NaN }),
      InvalidRequest,
    );
    assert.equal(nan.field, "min_validity");
    assert.throws(() => new BrokerClient(address, { timeoutMs: 0 }), TypeError);
    assert.equal(received.length, before);
  });

  client.close();
} finally {
  server.forceShutdown();
}

console.log(`${passed} passed, 0 failed`);
