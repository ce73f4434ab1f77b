/**
 * The Node/TypeScript client of qbo-token-broker: ask the broker for a QuickBooks
 * Online access token, by company (`realmId`) or by owning user (`userId`).
 *
 * ```ts
 * const broker = new BrokerClient("qbo-broker:50051");
 * const token = await broker.getAccessToken({ realmId: "9130350000000001" });
 * // token.accessToken, token.expiresAt, token.realmId, ...
 * broker.close();
 * ```
 *
 * Failures arrive as typed errors (`ReauthorizationRequired`, `ConnectionNotFound`,
 * `InvalidRequest`, `PermissionDenied`, `BrokerUnavailable`, else `BrokerError`),
 * read from the `google.rpc.Status` details the broker sends (`ErrorInfo`,
 * `RetryInfo`, `BadRequest`). Like the Python client (`broker/client.py`),
 * UNAVAILABLE answers that carry a retry delay are retried within the call's
 * timeout; anything else is thrown at once.
 *
 * The access token is never part of an error message, and a result's
 * `JSON.stringify`, `String()` and `util.inspect` (so `console.log`) leave it out.
 */
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { inspect } from "node:util";

import grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

/** The `ErrorInfo.domain` of the broker's own errors; reasons from other domains are ignored. */
export const ERROR_DOMAIN = "qbo-broker";

/** `ErrorInfo.reason` values the broker sends (docs/api.md). */
export const Reason = {
  REAUTHORIZATION_REQUIRED: "REAUTHORIZATION_REQUIRED",
  AMBIGUOUS_USER: "AMBIGUOUS_USER",
  INTUIT_UNAVAILABLE: "INTUIT_UNAVAILABLE",
  STORAGE_UNAVAILABLE: "STORAGE_UNAVAILABLE",
  REFRESH_PENDING: "REFRESH_PENDING",
  SHUTTING_DOWN: "SHUTTING_DOWN",
  INTUIT_CLIENT_REJECTED: "INTUIT_CLIENT_REJECTED",
} as const;

const PACKAGE_DIR = fileURLToPath(new URL("..", import.meta.url));
const PROTOS_DIR = join(PACKAGE_DIR, "protos");
/** Where `npm run build` puts the copy of the repository's broker.proto. */
export const DEFAULT_PROTO_PATH = join(PROTOS_DIR, "qbo", "broker", "v1", "broker.proto");
const SERVICE = "qbo.broker.v1.TokenBrokerService";
const DEFAULT_TIMEOUT_MS = 10_000;
const MIN_ATTEMPT_MS = 50;

// ---------------------------------------------------------------------------------------
// Errors

/** Base of every error this client throws on purpose. */
export class BrokerError extends Error {
  /** The gRPC status code name, e.g. `"FAILED_PRECONDITION"`. */
  readonly code: string;
  /** The broker's `ErrorInfo.reason` (domain `qbo-broker`), if it sent one. */
  readonly reason: string | undefined;
  /** The broker's `ErrorInfo.metadata` (e.g. `realm_id`, `intuit_tid`); never a token. */
  readonly metadata: Readonly<Record<string, string>>;

  constructor(
    code: string,
    message: string,
    options: { reason?: string; metadata?: Record<string, string>; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.reason = options.reason;
    this.metadata = Object.freeze({ ...(options.metadata ?? {}) });
  }
}

/** The customer must connect the company again (Intuit refused the grant, or it expired). */
export class ReauthorizationRequired extends BrokerError {
  /** The company to send the customer back to (also when asked by `userId`). */
  readonly realmId: string;
  /** Why, as the broker says it. */
  readonly detail: string;

  constructor(
    message: string,
    realmId: string,
    detail: string,
    options: { metadata?: Record<string, string>; cause?: unknown } = {},
  ) {
    super("FAILED_PRECONDITION", message, { ...options, reason: Reason.REAUTHORIZATION_REQUIRED });
    this.realmId = realmId;
    this.detail = detail;
  }
}

/** No connection for that realm or user. */
export class ConnectionNotFound extends BrokerError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super("NOT_FOUND", message, options);
  }
}

/** The request is malformed; `field` names the request field (from `BadRequest`). */
export class InvalidRequest extends BrokerError {
  /** The offending field, e.g. `"realm_id"` or `"min_validity"` (`"request"` when unknown). */
  readonly field: string;
  /** Every `BadRequest` field violation the broker sent. */
  readonly violations: ReadonlyArray<{ field: string; description: string }>;

  constructor(
    field: string,
    message: string,
    options: { violations?: Array<{ field: string; description: string }>; cause?: unknown } = {},
  ) {
    super("INVALID_ARGUMENT", message, options.cause === undefined ? {} : { cause: options.cause });
    this.field = field;
    this.violations = Object.freeze([...(options.violations ?? [])]);
  }
}

/** The broker's authorization policy does not let this caller (certificate) do this. */
export class PermissionDenied extends BrokerError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super("PERMISSION_DENIED", message, options);
  }
}

/**
 * The broker (or Intuit or the database behind it) cannot give a token now, or could
 * not be reached. `reason` says which (`INTUIT_UNAVAILABLE`, `STORAGE_UNAVAILABLE`,
 * `REFRESH_PENDING`, `SHUTTING_DOWN`; undefined when the broker itself was not reached);
 * `retryAfterMs` says when to come back, when the broker knows.
 */
export class BrokerUnavailable extends BrokerError {
  readonly retryAfterMs: number | undefined;

  constructor(
    message: string,
    options: {
      code?: string;
      reason?: string;
      retryAfterMs?: number;
      metadata?: Record<string, string>;
      cause?: unknown;
    } = {},
  ) {
    super(options.code ?? "UNAVAILABLE", message, options);
    this.retryAfterMs = options.retryAfterMs;
  }
}

// ---------------------------------------------------------------------------------------
// The result

/** What `getAccessToken` resolves to. */
export interface AccessTokenFields {
  /** The bearer token for the QuickBooks accounting API. */
  readonly accessToken: string;
  /** When the access token expires, as Intuit stated it (no margin taken off). */
  readonly expiresAt: Date;
  /** The company the token belongs to. */
  readonly realmId: string;
  /** The refresh token's rolling (~101-day) expiry, when the broker knows it. */
  readonly refreshTokenExpiresAt?: Date | undefined;
  /** Intuit's hard five-year limit for the grant, when known. */
  readonly reconnectDeadline?: Date | undefined;
}

/**
 * An access token and its dates. `accessToken` is a non-enumerable property: read it
 * directly (`token.accessToken`); `JSON.stringify`, `String()`, `util.inspect` and
 * `console.log` of the object, and `{ ...token }`, leave it out.
 */
export class AccessToken implements AccessTokenFields {
  declare readonly accessToken: string;
  readonly expiresAt: Date;
  readonly realmId: string;
  readonly refreshTokenExpiresAt: Date | undefined;
  readonly reconnectDeadline: Date | undefined;

  constructor(fields: AccessTokenFields) {
    Object.defineProperty(this, "accessToken", {
      value: fields.accessToken,
      enumerable: false,
      writable: false,
      configurable: false,
    });
    this.expiresAt = fields.expiresAt;
    this.realmId = fields.realmId;
    this.refreshTokenExpiresAt = fields.refreshTokenExpiresAt;
    this.reconnectDeadline = fields.reconnectDeadline;
  }

  /** Everything but the token. */
  toJSON(): Record<string, string> {
    const shown: Record<string, string> = {
      realmId: this.realmId,
      expiresAt: this.expiresAt.toISOString(),
    };
    if (this.refreshTokenExpiresAt) {
      shown.refreshTokenExpiresAt = this.refreshTokenExpiresAt.toISOString();
    }
    if (this.reconnectDeadline) {
      shown.reconnectDeadline = this.reconnectDeadline.toISOString();
    }
    return shown;
  }

  toString(): string {
    return `AccessToken(realmId=${this.realmId}, expiresAt=${this.expiresAt.toISOString()})`;
  }

  [inspect.custom](): string {
    return this.toString();
  }
}

// ---------------------------------------------------------------------------------------
// The client

/** PEM material for TLS. Give `privateKey` and `certChain` together for mutual TLS. */
export interface TlsCredentials {
  /** The CA bundle that signed the broker's certificate; unset: the system's roots. */
  rootCert?: Buffer;
  /** This caller's private key (PEM). */
  privateKey?: Buffer;
  /** This caller's certificate chain (PEM), leaf first. */
  certChain?: Buffer;
}

export interface BrokerClientOptions {
  /** TLS (mutual when `privateKey` and `certChain` are given); unset: plaintext. */
  credentials?: TlsCredentials;
  /** How long one `getAccessToken` may take, retries included (default 10 000 ms). */
  timeoutMs?: number;
  /** The broker.proto to load (default: the copy `npm run build` puts in this package). */
  protoPath?: string;
  /** Extra gRPC channel options, e.g. `{ "grpc.ssl_target_name_override": "qbo-broker" }`. */
  channelOptions?: grpc.ChannelOptions;
}

/** Which connection: by company or by owning user, exactly one. */
export type ConnectionRef =
  { realmId: string; userId?: undefined } | { userId: string; realmId?: undefined };

export interface GetAccessTokenOptions {
  /**
   * The token must stay valid at least this long (seconds; fractions allowed).
   * Unset: the broker's default, 5 minutes; 0: any unexpired token; at most 3300.
   */
  minValiditySeconds?: number;
}

interface WireTimestamp {
  seconds?: number | string;
  nanos?: number;
}

interface WireRequest {
  realmId?: string;
  userId?: string;
  minValidity?: { seconds: number; nanos: number };
}

interface WireResponse {
  accessToken?: string;
  expiresAt?: WireTimestamp | null;
  realmId?: string;
  refreshTokenExpiresAt?: WireTimestamp | null;
  reconnectDeadline?: WireTimestamp | null;
}

type GetAccessTokenMethod = grpc.MethodDefinition<WireRequest, WireResponse>;

const methods = new Map<string, GetAccessTokenMethod>();

function loadMethod(protoPath: string): GetAccessTokenMethod {
  const cached = methods.get(protoPath);
  if (cached) {
    return cached;
  }
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: [PROTOS_DIR],
  });
  const service = definition[SERVICE] as grpc.ServiceDefinition | undefined;
  const method = service?.GetAccessToken as GetAccessTokenMethod | undefined;
  if (!method) {
    throw new Error(`${protoPath} does not define ${SERVICE}.GetAccessToken`);
  }
  methods.set(protoPath, method);
  return method;
}

function channelCredentials(tls: TlsCredentials | undefined): grpc.ChannelCredentials {
  if (tls === undefined) {
    return grpc.credentials.createInsecure();
  }
  if ((tls.privateKey === undefined) !== (tls.certChain === undefined)) {
    throw new TypeError(
      "credentials: give privateKey and certChain together (mutual TLS needs both)",
    );
  }
  return grpc.credentials.createSsl(
    tls.rootCert ?? null,
    tls.privateKey ?? null,
    tls.certChain ?? null,
  );
}

export class BrokerClient {
  private readonly client: grpc.Client;
  private readonly method: GetAccessTokenMethod;
  private readonly timeoutMs: number;

  constructor(target: string, options: BrokerClientOptions = {}) {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) {
      throw new TypeError(`timeoutMs must be a positive number of milliseconds, not ${timeoutMs}`);
    }
    this.timeoutMs = timeoutMs;
    this.method = loadMethod(options.protoPath ?? DEFAULT_PROTO_PATH);
    this.client = new grpc.Client(
      target,
      channelCredentials(options.credentials),
      options.channelOptions ?? {},
    );
  }

  /** An access token for one company, refreshed first by the broker when needed. */
  async getAccessToken(
    connection: ConnectionRef,
    options: GetAccessTokenOptions = {},
  ): Promise<AccessToken> {
    const request = buildRequest(connection, options);
    const deadline = performance.now() + this.timeoutMs;
    for (;;) {
      let reply: WireResponse;
      try {
        reply = await this.call(request, Math.max(MIN_ATTEMPT_MS, deadline - performance.now()));
      } catch (caught) {
        if (!isServiceError(caught)) {
          throw caught;
        }
        const error = translate(caught);
        const wait = error instanceof BrokerUnavailable ? error.retryAfterMs : undefined;
        if (wait === undefined || performance.now() + wait >= deadline) {
          throw error;
        }
        await sleep(wait);
        continue;
      }
      return toAccessToken(reply);
    }
  }

  /** Closes the channel; calls after this fail. */
  close(): void {
    this.client.close();
  }

  private call(request: WireRequest, timeoutMs: number): Promise<WireResponse> {
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        this.method.path,
        this.method.requestSerialize,
        this.method.responseDeserialize,
        request,
        new grpc.Metadata(),
        { deadline: new Date(Date.now() + timeoutMs) },
        (error, reply) => {
          if (error) {
            reject(error);
          } else {
            resolve(reply ?? {});
          }
        },
      );
    });
  }
}

function buildRequest(connection: ConnectionRef, options: GetAccessTokenOptions): WireRequest {
  const { realmId, userId } = (connection ?? {}) as { realmId?: unknown; userId?: unknown };
  const request: WireRequest = {};
  if (realmId !== undefined && userId === undefined && typeof realmId === "string") {
    request.realmId = realmId;
  } else if (userId !== undefined && realmId === undefined && typeof userId === "string") {
    request.userId = userId;
  } else {
    throw new InvalidRequest("connection", "connection: pass exactly one of realmId and userId");
  }
  const seconds = options.minValiditySeconds;
  if (seconds !== undefined) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) {
      throw new InvalidRequest("min_validity", "min_validity: must be a finite number of seconds");
    }
    request.minValidity = duration(seconds);
  }
  return request;
}

/** A google.protobuf.Duration: seconds and nanos share the sign. */
function duration(totalSeconds: number): { seconds: number; nanos: number } {
  let seconds = Math.trunc(totalSeconds);
  let nanos = Math.round((totalSeconds - seconds) * 1e9);
  if (Math.abs(nanos) >= 1e9) {
    seconds += Math.sign(nanos);
    nanos = 0;
  }
  return { seconds, nanos };
}

function toDate(stamp: WireTimestamp | null | undefined): Date | undefined {
  if (stamp === null || stamp === undefined) {
    return undefined;
  }
  return new Date(Number(stamp.seconds ?? 0) * 1000 + Math.floor((stamp.nanos ?? 0) / 1e6));
}

function toAccessToken(reply: WireResponse): AccessToken {
  const expiresAt = toDate(reply.expiresAt);
  if (!reply.accessToken || expiresAt === undefined) {
    throw new BrokerError("INTERNAL", "the broker's answer lacks the access token or expires_at");
  }
  return new AccessToken({
    accessToken: reply.accessToken,
    expiresAt,
    realmId: reply.realmId ?? "",
    refreshTokenExpiresAt: toDate(reply.refreshTokenExpiresAt),
    reconnectDeadline: toDate(reply.reconnectDeadline),
  });
}

// ---------------------------------------------------------------------------------------
// Reading the status details (grpc-status-details-bin: a google.rpc.Status)

interface Details {
  info?: { reason: string; domain: string; metadata: Record<string, string> };
  retryAfterMs?: number;
  violations: Array<{ field: string; description: string }>;
}

let rpcTypes: { status: protobuf.Type; byName: Map<string, protobuf.Type> } | undefined;

function loadRpcTypes(): NonNullable<typeof rpcTypes> {
  if (rpcTypes === undefined) {
    const files = ["status.proto", "error_details.proto"].map((name) =>
      join(PROTOS_DIR, "google", "rpc", name),
    );
    const root = new protobuf.Root().loadSync(files, { keepCase: true });
    const byName = new Map<string, protobuf.Type>();
    for (const name of ["google.rpc.ErrorInfo", "google.rpc.RetryInfo", "google.rpc.BadRequest"]) {
      byName.set(name, root.lookupType(name));
    }
    rpcTypes = { status: root.lookupType("google.rpc.Status"), byName };
  }
  return rpcTypes;
}

function decode<T>(type: protobuf.Type, bytes: Uint8Array): T {
  return type.toObject(type.decode(bytes), {
    longs: Number,
    defaults: true,
    arrays: true,
    objects: true,
  }) as T;
}

function readDetails(error: grpc.ServiceError): Details {
  const details: Details = { violations: [] };
  const values = error.metadata?.get("grpc-status-details-bin") ?? [];
  const raw = values[0];
  if (!(raw instanceof Uint8Array)) {
    return details;
  }
  let status: { details: Array<{ type_url: string; value: Uint8Array }> };
  const types = loadRpcTypes();
  try {
    status = decode(types.status, raw);
  } catch {
    return details; // a garbled trailer: fall back to the status code alone
  }
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = types.byName.get(name);
    if (type === undefined) {
      continue;
    }
    try {
      if (name === "google.rpc.ErrorInfo") {
        details.info = decode(type, any.value);
      } else if (name === "google.rpc.RetryInfo") {
        const retry = decode<{ retry_delay?: { seconds: number; nanos: number } }>(type, any.value);
        if (retry.retry_delay) {
          details.retryAfterMs = Math.max(
            0,
            retry.retry_delay.seconds * 1000 + retry.retry_delay.nanos / 1e6,
          );
        }
      } else if (name === "google.rpc.BadRequest") {
        const bad = decode<{ field_violations: Array<{ field: string; description: string }> }>(
          type,
          any.value,
        );
        for (const violation of bad.field_violations) {
          details.violations.push({ field: violation.field, description: violation.description });
        }
      }
    } catch {
      // one undecodable detail does not hide the others
    }
  }
  return details;
}

function isServiceError(value: unknown): value is grpc.ServiceError {
  return (
    value instanceof Error &&
    typeof (value as Partial<grpc.ServiceError>).code === "number" &&
    "metadata" in value
  );
}

function statusName(code: number): string {
  return grpc.status[code] ?? `STATUS_${code}`;
}

function translate(error: grpc.ServiceError): BrokerError {
  const code = statusName(error.code);
  const message = error.details || code;
  const { info, retryAfterMs, violations } = readDetails(error);
  const ours = info !== undefined && info.domain === ERROR_DOMAIN;
  const reason = ours && info.reason ? info.reason : undefined;
  const metadata = ours ? info.metadata : {};
  const cause = error;
  if (reason === Reason.REAUTHORIZATION_REQUIRED) {
    const detail = metadata.detail || message;
    return new ReauthorizationRequired(message, metadata.realm_id ?? "", detail, {
      metadata,
      cause,
    });
  }
  switch (error.code) {
    case grpc.status.NOT_FOUND:
      return new ConnectionNotFound(message, { cause });
    case grpc.status.INVALID_ARGUMENT:
      return new InvalidRequest(violations[0]?.field ?? "request", message, {
        violations,
        cause,
      });
    case grpc.status.PERMISSION_DENIED:
      return new PermissionDenied(message, { cause });
    case grpc.status.UNAVAILABLE:
    case grpc.status.DEADLINE_EXCEEDED:
      return new BrokerUnavailable(message, { code, reason, retryAfterMs, metadata, cause });
    default:
      return new BrokerError(code, `${code}: ${message}`, { reason, metadata, cause });
  }
}
