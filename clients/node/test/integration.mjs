// Integration checks of the built client (dist/) against a running broker.
//
//   BROKER_ADDR=127.0.0.1:50051 BROKER_REALMS='{...}' node test/integration.mjs
//   node test/integration.mjs 127.0.0.1:50051          (BROKER_REALMS still from the env)
//
// BROKER_REALMS describes what the broker was seeded with:
//   {
//     "active":          {"realmId": "...", "userId": "..."},  a working connection, token valid
//                                                             for well over 5 minutes
//     "reauthorization": {"realmId": "...", "userId": "..."},  a grant Intuit has revoked (the
//                                                             broker already knows or will learn)
//     "intuitDown":      {"realmId": "..."},                  expired access token, and Intuit
//                                                             answers its next refresh with a 5xx
//     "unknownRealmId":  "..."                                 a well-formed realm nobody seeded
//   }
// The checks run in this order; the Intuit-down one is the only one that should reach
// Intuit before the last (min-validity) check, which refreshes the active realm.
// One line per passed check; the first failure exits 1 with what went wrong.
import assert from "node:assert/strict";
import { inspect } from "node:util";

import {
  AccessToken,
  BrokerClient,
  BrokerError,
  BrokerUnavailable,
  ConnectionNotFound,
  InvalidRequest,
  ReauthorizationRequired,
} from "../dist/index.js";

const address = process.argv[2] ?? process.env.BROKER_ADDR;
const realmsJson = process.env.BROKER_REALMS;

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

if (!address) {
  fail("no broker address: pass it as the first argument or set BROKER_ADDR (host:port)");
}
if (!realmsJson) {
  fail("BROKER_REALMS is not set (JSON: active, reauthorization, intuitDown, unknownRealmId)");
}
let realms;
try {
  realms = JSON.parse(realmsJson);
} catch (error) {
  fail(`BROKER_REALMS is not JSON: ${error.message}`);
}
for (const key of ["active", "reauthorization", "intuitDown"]) {
  if (typeof realms?.[key]?.realmId !== "string") {
    fail(`BROKER_REALMS.${key}.realmId is missing`);
  }
}
for (const key of ["active", "reauthorization"]) {
  if (typeof realms[key].userId !== "string") {
    fail(`BROKER_REALMS.${key}.userId is missing`);
  }
}
if (typeof realms.unknownRealmId !== "string") {
  fail("BROKER_REALMS.unknownRealmId is missing");
}

let passed = 0;
const secrets = new Set(); // every token seen: none may show in any error or rendering

async function check(name, body) {
  let note;
  try {
    note = await body();
  } catch (error) {
    let shown = error instanceof Error ? (error.stack ?? error.message) : String(error);
    for (const secret of secrets) {
      shown = shown.split(secret).join("<token>");
    }
    fail(`${name}\n${shown}`);
  }
  passed += 1;
  console.log(`ok ${passed} - ${name}${note ? ` [${note}]` : ""}`);
}

/** Runs `call` and returns what it threw, checking the class and that no token leaks. */
async function rejection(call, type) {
  let thrown;
  try {
    await call();
  } catch (error) {
    thrown = error;
  }
  assert.ok(thrown !== undefined, `expected ${type.name}, but the call succeeded`);
  assert.ok(
    thrown instanceof type,
    `expected ${type.name}, got ${thrown?.name}: ${thrown?.message} (code ${thrown?.code})`,
  );
  assert.ok(thrown instanceof BrokerError, "every error the client throws is a BrokerError");
  const rendered = `${thrown.message}\n${thrown.stack}\n${inspect(thrown, { depth: 5 })}`;
  for (const secret of secrets) {
    assert.ok(!rendered.includes(secret), "an error message shows an access token");
  }
  return thrown;
}

function assertFutureDate(value, what) {
  assert.ok(value instanceof Date, `${what} is not a Date: ${inspect(value)}`);
  assert.ok(!Number.isNaN(value.getTime()), `${what} is an invalid Date`);
  assert.ok(value.getTime() > Date.now(), `${what} (${value.toISOString()}) is not in the future`);
}

function assertGoodToken(token, realmId, what) {
  assert.ok(token instanceof AccessToken, `${what}: not an AccessToken`);
  assert.equal(typeof token.accessToken, "string", `${what}: accessToken is not a string`);
  assert.ok(token.accessToken.length > 0, `${what}: accessToken is empty`);
  secrets.add(token.accessToken);
  assert.equal(token.realmId, realmId, `${what}: realmId`);
  assertFutureDate(token.expiresAt, `${what}: expiresAt`);
  assertFutureDate(token.refreshTokenExpiresAt, `${what}: refreshTokenExpiresAt`);
  assert.ok(
    token.refreshTokenExpiresAt > token.expiresAt,
    `${what}: the refresh token expires before the access token`,
  );
  if (token.reconnectDeadline !== undefined) {
    assertFutureDate(token.reconnectDeadline, `${what}: reconnectDeadline`);
  }
}

const client = new BrokerClient(address, { timeoutMs: 10_000 });
const { active, reauthorization, intuitDown, unknownRealmId } = realms;
let token;

try {
  await check(`a token by realm (${active.realmId}) with future Dates`, async () => {
    token = await client.getAccessToken({ realmId: active.realmId });
    assertGoodToken(token, active.realmId, "by realm");
  });

  await check(`a token by user (${active.userId}) names the realm`, async () => {
    const byUser = await client.getAccessToken({ userId: active.userId });
    assertGoodToken(byUser, active.realmId, "by user");
  });

  await check("JSON.stringify, util.inspect and String() of a result hide the token", () => {
    const secret = token.accessToken;
    const renderings = {
      "JSON.stringify": JSON.stringify(token),
      "JSON.stringify (nested)": JSON.stringify({ token, list: [token] }),
      "util.inspect": inspect(token),
      "util.inspect (showHidden)": inspect(token, { showHidden: true, depth: 5 }),
      "util.inspect (nested)": inspect({ token, list: [token] }, { depth: 5 }),
      "String()": String(token),
      "template literal": `${token}`,
      "spread copy": JSON.stringify({ ...token }) + inspect({ ...token }),
      "Object.keys": Object.keys(token).join(","),
    };
    for (const [how, text] of Object.entries(renderings)) {
      assert.ok(!text.includes(secret), `${how} shows the access token: ${how}`);
    }
    assert.ok(renderings["JSON.stringify"].includes(active.realmId), "JSON lost the realm");
    assert.ok(renderings["util.inspect"].includes(active.realmId), "inspect lost the realm");
    assert.equal(JSON.parse(renderings["JSON.stringify"]).expiresAt, token.expiresAt.toISOString());
  });

  await check(
    `REAUTHORIZATION_REQUIRED → ReauthorizationRequired (${reauthorization.realmId})`,
    async () => {
      const byRealm = await rejection(
        () => client.getAccessToken({ realmId: reauthorization.realmId }),
        ReauthorizationRequired,
      );
      assert.equal(byRealm.realmId, reauthorization.realmId);
      assert.equal(byRealm.code, "FAILED_PRECONDITION");
      assert.equal(byRealm.reason, "REAUTHORIZATION_REQUIRED");
      assert.equal(typeof byRealm.detail, "string");
      assert.ok(byRealm.detail.length > 0, "detail is empty");
      // Asked by user, the caller still learns which company to send the customer back to.
      const byUser = await rejection(
        () => client.getAccessToken({ userId: reauthorization.userId }),
        ReauthorizationRequired,
      );
      assert.equal(byUser.realmId, reauthorization.realmId);
    },
  );

  await check(`an unknown realm (${unknownRealmId}) → ConnectionNotFound`, async () => {
    const error = await rejection(
      () => client.getAccessToken({ realmId: unknownRealmId }),
      ConnectionNotFound,
    );
    assert.equal(error.code, "NOT_FOUND");
  });

  await check("a malformed realm id → InvalidRequest naming realm_id", async () => {
    const error = await rejection(
      () => client.getAccessToken({ realmId: "9130/35" }),
      InvalidRequest,
    );
    assert.equal(error.field, "realm_id");
    assert.equal(error.code, "INVALID_ARGUMENT");
  });

  await check(
    "minValiditySeconds above 55 minutes → InvalidRequest naming min_validity",
    async () => {
      const error = await rejection(
        () => client.getAccessToken({ realmId: active.realmId }, { minValiditySeconds: 3600 }),
        InvalidRequest,
      );
      assert.equal(error.field, "min_validity");
    },
  );

  await check("naming both or neither of realmId/userId fails before any call", async () => {
    // Nothing listens on port 1: a call that went out would end in BrokerUnavailable.
    const nowhere = new BrokerClient("127.0.0.1:1", { timeoutMs: 2_000 });
    try {
      const neither = await rejection(() => nowhere.getAccessToken({}), InvalidRequest);
      assert.equal(neither.field, "connection");
      await rejection(
        () => nowhere.getAccessToken({ realmId: active.realmId, userId: active.userId }),
        InvalidRequest,
      );
      const unreachable = await rejection(
        () => nowhere.getAccessToken({ realmId: active.realmId }),
        BrokerUnavailable,
      );
      assert.equal(unreachable.retryAfterMs, undefined);
    } finally {
      nowhere.close();
    }
  });

  await check(
    `Intuit down, token expired → BrokerUnavailable with retryAfterMs (${intuitDown.realmId})`,
    async () => {
      const impatient = new BrokerClient(address, { timeoutMs: 1_000 });
      const started = performance.now();
      try {
        const error = await rejection(
          () => impatient.getAccessToken({ realmId: intuitDown.realmId }),
          BrokerUnavailable,
        );
        assert.equal(error.code, "UNAVAILABLE");
        assert.equal(error.reason, "INTUIT_UNAVAILABLE");
        assert.equal(typeof error.retryAfterMs, "number", "no RetryInfo read");
        assert.ok(error.retryAfterMs > 0, `retryAfterMs ${error.retryAfterMs}`);
        assert.ok(error.retryAfterMs <= 120_000, `retryAfterMs ${error.retryAfterMs}`);
        const elapsed = performance.now() - started;
        assert.ok(elapsed < 3_000, `took ${Math.round(elapsed)} ms with a 1 s timeout`);
        const tid = error.metadata.intuit_tid;
        return `retryAfterMs=${error.retryAfterMs}${tid ? `, intuit_tid=${tid}` : ""}`;
      } finally {
        impatient.close();
      }
    },
  );

  await check(
    "minValiditySeconds makes the broker refresh; reconnectDeadline is a Date",
    async () => {
      const renewed = await client.getAccessToken(
        { realmId: active.realmId },
        { minValiditySeconds: 55 * 60 },
      );
      assertGoodToken(renewed, active.realmId, "renewed");
      assert.notEqual(renewed.accessToken, token.accessToken, "the token was not renewed");
      assert.ok(
        renewed.expiresAt.getTime() - Date.now() >= 54 * 60 * 1000,
        `expiresAt ${renewed.expiresAt.toISOString()} is not ~55 minutes away`,
      );
      assertFutureDate(renewed.reconnectDeadline, "renewed: reconnectDeadline");
    },
  );
} finally {
  client.close();
}

console.log(`${passed} passed, 0 failed`);
