// Test harness of the Switchboard integration suite.
//
// It starts real gateway and worker processes (built beforehand by cargo),
// gives each test file its own PostgreSQL database and Redis key prefix,
// serves a JWKS for the gateways to verify hand-minted RS256 tokens against,
// and offers small helpers around socket.io-client and fetch.
//
//   MODE=cluster        (default) N gateways + M workers on PostgreSQL and Redis
//   MODE=redis-cluster  the same on a Redis Cluster: REDIS_URL is TEST_REDIS_CLUSTER_URL,
//                       else the URL of `scripts/redis-cluster url` (start it first:
//                       scripts/redis-cluster start). The exported MODE stays 'cluster'
//                       (tests ask MODE === 'cluster'); REDIS_CLUSTER tells the two apart
//   MODE=embedded       one gateway process with its in-process bus and SQLite
//   SWITCHBOARD_BIN_DIR  where switchboard-gateway / switchboard-worker live
//                        (default: ../../target/debug relative to tests/js)
//
// Output stays quiet while tests pass; when one fails, the tail of every
// process's stdout/stderr is printed (see useCluster).

import { spawn, spawnSync, execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before } from 'node:test';
import { io } from 'socket.io-client';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PKG_DIR = path.resolve(HERE, '..');

export const MODE = process.env.MODE === 'embedded' ? 'embedded' : 'cluster';
/** MODE=redis-cluster: MODE is 'cluster', on a Redis Cluster. */
export const REDIS_CLUSTER = process.env.MODE === 'redis-cluster';
export const BIN_DIR = path.resolve(PKG_DIR, process.env.SWITCHBOARD_BIN_DIR || '../../target/debug');
export const GATEWAY_BIN = path.join(BIN_DIR, 'switchboard-gateway');
export const WORKER_BIN = path.join(BIN_DIR, 'switchboard-worker');

const PG_HOST = '127.0.0.1';
const PG_PORT = 5432;
const PG_USER = 'postgres';
const REDIS_HOST = '127.0.0.1';
const REDIS_PORT = 6379;
const REDIS_URL = `redis://${REDIS_HOST}:${REDIS_PORT}`;
const REDIS_CLUSTER_SCRIPT = path.resolve(PKG_DIR, '../../scripts/redis-cluster');

/** The REDIS_URL every deployment gets (unless startCluster is given `redisUrl`). */
export const REDIS_URL_IN_USE = !REDIS_CLUSTER ? REDIS_URL : (process.env.TEST_REDIS_CLUSTER_URL || defaultRedisClusterUrl());

function defaultRedisClusterUrl() {
  // The script owns the port layout (REDIS_CLUSTER_BASE_PORT), so ask it.
  const r = spawnSync(REDIS_CLUSTER_SCRIPT, ['url'], { encoding: 'utf8', timeout: 10_000 });
  const url = (r.stdout || '').trim().split('\n').pop();
  if (r.status !== 0 || !url) throw new Error(`MODE=redis-cluster: ${REDIS_CLUSTER_SCRIPT} url failed: ${r.error?.message || r.stderr}`);
  return url;
}

/** Issuer and authorized party every gateway is configured with. */
export const ISSUER = 'https://clerk.test';
export const AUTHORIZED_PARTY = 'http://localhost:3000';

/** The Socket.IO path / namespace of the contract (§1). */
export const SIO_PATH = '/api/socket.io';

const READY_TIMEOUT_MS = 30_000;
const STOP_GRACE_MS = 5_000;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Lowercase hex of `bytes` random bytes. */
export const randomHex = (bytes = 6) => crypto.randomBytes(bytes).toString('hex');

/** A fresh user id in Clerk's style (`user_...`), unique per call. */
export const uid = (label = 'u') => `user_${label}_${randomHex(6)}`;

/** Any RFC 4122 UUID, and the time-ordered version 7 the gateway assigns. */
export const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const UUID_V7_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/i;
/** An ISO 8601 timestamp with date and time (what `toISOString` and chrono produce). */
export const ISO_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

function execFileP(file, args, options = {}) {
  return new Promise((resolve, reject) => {
    execFile(file, args, { maxBuffer: 16 * 1024 * 1024, ...options }, (err, stdout, stderr) => {
      if (err) {
        err.stdout = stdout;
        err.stderr = stderr;
        reject(err);
      } else resolve({ stdout, stderr });
    });
  });
}

/** Listens on `port` of 127.0.0.1 (0: any) and closes again; resolves with the port. */
function listenOnce(port) {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(port, '127.0.0.1', () => {
      const { port: bound } = srv.address();
      srv.close(() => resolve(bound));
    });
  });
}

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort() {
  return listenOnce(0);
}

/**
 * A base port N such that N..N+5 and their cluster bus ports N+10000..N+10005 were free a
 * moment ago (a random N in 20000-40000, so parallel test files rarely try the same one).
 */
export async function freeRedisClusterBasePort() {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20_000 + crypto.randomInt(20_000);
    const ports = [0, 1, 2, 3, 4, 5].flatMap((i) => [base + i, base + i + 10_000]);
    try {
      for (const p of ports) await listenOnce(p);
      return base;
    } catch {
      // taken: another base
    }
  }
  throw new Error('no 6 consecutive free ports (and bus ports) found in 20000-50005');
}

// ---------------------------------------------------------------------------
// PostgreSQL and Redis housekeeping (through the psql and redis-cli clients)
// ---------------------------------------------------------------------------

const PSQL_ARGS = ['-h', PG_HOST, '-p', String(PG_PORT), '-U', PG_USER, '-d', 'postgres', '-v', 'ON_ERROR_STOP=1', '-qAtc'];

async function psql(sql) {
  try {
    return (await execFileP('psql', [...PSQL_ARGS, sql], { timeout: 30_000 })).stdout;
  } catch (e) {
    throw new Error(`psql failed (${sql}): ${e.stderr || e.message}`);
  }
}

/**
 * Where a REDIS_URL points: {cluster, nodes: [{host, port}]}. For redis-cluster://
 * (fred's syntax, `redis-cluster://h:p?node=h2:p2&node=…`) the nodes are the seeds.
 */
export function parseRedisUrl(redisUrl) {
  const u = new URL(redisUrl);
  const node = (hostPort, dflt) => {
    const m = /^\[?([^\]]*?)\]?(?::(\d+))?$/.exec(hostPort);
    return { host: m[1] || REDIS_HOST, port: Number(m[2] || dflt) };
  };
  const first = { host: u.hostname.replace(/^\[|\]$/g, '') || REDIS_HOST, port: Number(u.port || 6379) };
  if (u.protocol === 'redis-cluster:' || u.protocol === 'rediss-cluster:') {
    return { cluster: true, nodes: [first, ...u.searchParams.getAll('node').map((n) => node(n, 6379))] };
  }
  return { cluster: false, nodes: [first] };
}

function redisCleanupCommand(redisUrl, prefix) {
  // The prefix ends in a fixed-length random id, so `<prefix>*` matches only this run's keys.
  const target = parseRedisUrl(redisUrl);
  if (!target.cluster) {
    const cli = `redis-cli -h ${target.nodes[0].host} -p ${target.nodes[0].port}`;
    return `${cli} --scan --pattern '${prefix}*' | xargs -r -n 500 ${cli} del > /dev/null`;
  }
  // On a cluster, SCAN sees one node's keys and a multi-key DEL/UNLINK across slots is
  // CROSSSLOT: every master is scanned and its keys are unlinked one per command on that
  // same node (quoted for redis-cli's line parser). The masters come from the first seed
  // that answers, so a seed killed by a failover test does not stop the cleanup.
  const seeds = target.nodes.map(({ host, port }) => `redis-cli -h ${host} -p ${port} cluster nodes 2>/dev/null`).join(' || ');
  return [
    `nodes=$(${seeds}) || { echo 'no seed node of ${redisUrl} answers' >&2; exit 1; }`,
    `masters=$(printf '%s\\n' "$nodes" | awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, "@"); print a[1] }')`,
    `[ -n "$masters" ] || { echo 'no live master in CLUSTER NODES of ${redisUrl}' >&2; exit 1; }`,
    `for hp in $masters; do`,
    `  h=\${hp%:*}; p=\${hp##*:}`,
    `  redis-cli -h "$h" -p "$p" --scan --pattern '${prefix}*' | sed -e 's/[\\\\"]/\\\\&/g' -e 's/^/UNLINK "/' -e 's/$/"/' | redis-cli -h "$h" -p "$p" > /dev/null || exit 1`,
    `done`,
  ].join('\n');
}

// ---------------------------------------------------------------------------
// Authentication: RSA keys, a JWKS server and hand-minted JWTs
// ---------------------------------------------------------------------------

function newRsaKey() {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { kid: `test-${randomHex(6)}`, publicKey, privateKey };
}

/**
 * The identity provider of the tests (a stand-in for Clerk).
 *
 * `auth.token(userId, opts)` mints a JWT; `auth.rotate()` publishes a new key
 * and signs with it from then on (the old key stays published);
 * `auth.unpublishedKey()` is a key the JWKS never lists.
 */
class TestAuth {
  constructor() {
    this.published = [];
    this.current = null;
    this.server = null;
    this.jwksUrl = null;
    this.fetchCount = 0;
    this.jwksMode = 'ok';
    this._hung = new Set();
    this._foreign = null;
    this._starting = null;
  }

  /**
   * How the JWKS endpoint answers from now on: 'ok' (the key set), 'fail'
   * (HTTP 500 at once) or 'hang' (never answers). Leaving 'hang' closes the
   * requests held so far. Requests are counted in `fetchCount` in every mode.
   */
  setJwksMode(mode) {
    if (!['ok', 'fail', 'hang'].includes(mode)) throw new Error(`unknown JWKS mode ${mode}`);
    this.jwksMode = mode;
    if (mode !== 'hang') {
      for (const res of this._hung) res.destroy();
      this._hung.clear();
    }
  }

  /** Creates the first key and starts the JWKS server (idempotent). */
  start() {
    if (!this._starting) {
      this._starting = new Promise((resolve, reject) => {
        if (!this.current) {
          this.current = newRsaKey();
          this.published.push(this.current);
        }
        this.server = http.createServer((req, res) => {
          if (req.method === 'GET' && req.url.split('?')[0] === '/.well-known/jwks.json') {
            this.fetchCount++;
            if (this.jwksMode === 'hang') {
              this._hung.add(res);
              res.on('close', () => this._hung.delete(res));
              return;
            }
            if (this.jwksMode === 'fail') {
              res.writeHead(500, { 'content-type': 'application/json' });
              res.end('{"error":"identity provider down"}');
              return;
            }
            const body = JSON.stringify(this.jwks());
            res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
            res.end(body);
          } else {
            res.writeHead(404, { 'content-type': 'application/json' });
            res.end('{"error":"not found"}');
          }
        });
        this.server.on('error', reject);
        this.server.listen(0, '127.0.0.1', () => {
          this.server.unref(); // never keeps the test process alive
          this.jwksUrl = `http://127.0.0.1:${this.server.address().port}/.well-known/jwks.json`;
          resolve(this);
        });
      });
    }
    return this._starting;
  }

  /** The JSON Web Key Set the server publishes. */
  jwks() {
    return {
      keys: this.published.map((k) => ({ ...k.publicKey.export({ format: 'jwk' }), kid: k.kid, alg: 'RS256', use: 'sig' })),
    };
  }

  /** Publishes a new key (new kid) and signs with it from now on. Returns the new kid. */
  rotate() {
    this.current = newRsaKey();
    this.published.push(this.current);
    return this.current.kid;
  }

  /** A key pair that is not (and will never be) in the JWKS. */
  unpublishedKey() {
    if (!this._foreign) this._foreign = newRsaKey();
    return this._foreign;
  }

  /** Seconds since the epoch (the unit of exp/nbf/iat). */
  now() {
    return Math.floor(Date.now() / 1000);
  }

  /**
   * Mints a JWT for `userId` (the `sub`).
   *
   * Options (a claim given as `null` is left out):
   *   exp, nbf, iat   absolute epoch seconds (defaults now+60, now-1, now)
   *   iss, azp        defaults ISSUER and AUTHORIZED_PARTY
   *   name, image_url profile claims, absent unless given
   *   claims          extra claims merged last
   *   kid             header kid (default the current key's; null leaves it out)
   *   alg             'RS256' (default), 'HS256' (with `secret`) or 'none'
   *   key             private KeyObject to sign RS256 with (default the current key)
   *   secret          HMAC secret for HS256
   */
  token(userId, opts = {}) {
    if (!this.current) throw new Error('auth.start() has not run (startCluster calls it)');
    const now = this.now();
    const pick = (name, dflt) => (opts[name] === undefined ? dflt : opts[name]);
    const alg = opts.alg || 'RS256';
    const header = { alg, typ: 'JWT' };
    const kid = pick('kid', this.current.kid);
    if (kid !== null) header.kid = kid;
    const claims = {
      sub: userId,
      iat: pick('iat', now),
      nbf: pick('nbf', now - 1),
      exp: pick('exp', now + 60),
      iss: pick('iss', ISSUER),
      azp: pick('azp', AUTHORIZED_PARTY),
      name: pick('name', null),
      image_url: pick('image_url', null),
      ...(opts.claims || {}),
    };
    for (const k of Object.keys(claims)) if (claims[k] === null || claims[k] === undefined) delete claims[k];
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    let signature;
    if (alg === 'RS256') {
      signature = crypto.sign('sha256', Buffer.from(input), opts.key || this.current.privateKey);
    } else if (alg === 'HS256') {
      if (opts.secret === undefined) throw new Error('HS256 needs a secret');
      signature = crypto.createHmac('sha256', opts.secret).update(input).digest();
    } else if (alg === 'none') {
      signature = Buffer.alloc(0);
    } else {
      throw new Error(`unsupported alg ${alg}`);
    }
    return `${input}.${b64url(signature)}`;
  }
}

function b64url(data) {
  return Buffer.from(data).toString('base64url');
}

/** The identity provider of this test process (one RSA key pair per process). */
export const auth = new TestAuth();

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/** Keeps the last `limit` lines a process printed. */
class LogRing {
  constructor(limit = 400) {
    this.limit = limit;
    this.lines = [];
    this.partial = { out: '', err: '' };
  }

  push(stream, chunk) {
    const text = this.partial[stream] + chunk.toString('utf8');
    const parts = text.split('\n');
    this.partial[stream] = parts.pop();
    for (const line of parts) this.add(stream, line);
  }

  add(stream, line) {
    // eslint-disable-next-line no-control-regex
    this.lines.push(`${stream}| ${line.replace(/\x1b\[[0-9;]*m/g, '')}`);
    if (this.lines.length > this.limit) this.lines.splice(0, this.lines.length - this.limit);
  }

  tail(n = 60) {
    const rest = Object.entries(this.partial).filter(([, v]) => v).map(([s, v]) => `${s}| ${v}`);
    return [...this.lines, ...rest].slice(-n).join('\n');
  }
}

/** Variables of ours that must not leak from the runner's environment into a node. */
const SCRUBBED_ENV = /^(PORT|HOST|NODE_ID|REDIS_URL|DATABASE_URL|REDIS_PREFIX|DATA_DIR|AUTH_.*|STREAM_.*|LEASE_.*|NODE_TEST_CONTEXT|NODE_OPTIONS)$/;

function baseEnv() {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!SCRUBBED_ENV.test(k)) env[k] = v;
  if (!env.RUST_LOG) env.RUST_LOG = 'warn,switchboard=info';
  env.NO_COLOR = '1'; // plain logs in failure reports
  // Suites send bursts far above the contract's per-user rate (CONTRACT §10);
  // a test of the limit sets it through `env`.
  for (const area of ['MESSAGES', 'REACTIONS', 'CHANNELS', 'REST']) {
    if (env[`RATE_${area}_PER_S`] === undefined) env[`RATE_${area}_PER_S`] = '0';
  }
  if (env.MAX_CONNECTIONS_PER_USER === undefined) env.MAX_CONNECTIONS_PER_USER = '0';
  return env;
}

/** A child process with its output kept in a ring buffer. */
class Proc {
  constructor(name, file, args, env) {
    this.name = name;
    this.file = file;
    this.env = env;
    this.logs = new LogRing();
    this.exit = null; // {code, signal} once exited
    this.expectedExit = false; // set before we stop or kill it on purpose
    this.child = spawn(file, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.pid = this.child.pid;
    this.child.stdout.on('data', (d) => this.logs.push('out', d));
    this.child.stderr.on('data', (d) => this.logs.push('err', d));
    this.exited = new Promise((resolve) => {
      this.child.on('error', (err) => {
        this.logs.add('err', `spawn failed: ${err.message}` + (err.code === 'ENOENT' ? ` (build the binaries first: cargo build --bins)` : ''));
        this.exit = this.exit || { code: null, signal: null, error: err.message };
        resolve(this.exit);
      });
      this.child.on('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
  }

  get alive() {
    return this.exit === null;
  }

  describeExit() {
    if (!this.exit) return 'running';
    if (this.exit.error) return this.exit.error;
    return this.exit.signal ? `killed by ${this.exit.signal}` : `exited with code ${this.exit.code}`;
  }

  /** Sends `signal` and waits up to `graceMs` for the exit, then SIGKILLs. */
  async stop(signal = 'SIGTERM', graceMs = STOP_GRACE_MS) {
    this.expectedExit = true;
    if (!this.alive) return { ...this.exit, forced: false };
    this.child.kill(signal);
    const timer = new Promise((resolve) => setTimeout(() => resolve('timeout'), graceMs));
    const result = await Promise.race([this.exited, timer]);
    if (result === 'timeout') {
      this.child.kill('SIGKILL');
      await this.exited;
      return { ...this.exit, forced: true };
    }
    return { ...this.exit, forced: false };
  }
}

/** Waits for `url`/readyz to answer 200; with `node`, the answer must name that node (else the
 * port belongs to another process's gateway: an error with `portTaken`). */
async function waitReady(proc, url, node) {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let last = 'no answer';
  while (Date.now() < deadline) {
    if (!proc.alive) {
      throw new Error(`${proc.name} ${proc.describeExit()} before it was ready (${url}/readyz); last output:\n${proc.logs.tail(40)}`);
    }
    try {
      const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(1000) });
      if (res.status === 200) {
        const body = await res.json().catch(() => ({}));
        if (node === undefined || body.node === node) return;
        throw Object.assign(new Error(`${url} is answered by node ${body.node}, not ${node}`), { portTaken: true });
      }
      last = `HTTP ${res.status}: ${(await res.text()).slice(0, 200)}`;
    } catch (e) {
      if (e.portTaken) throw e;
      last = e.cause?.code || e.message;
    }
    await sleep(100);
  }
  throw new Error(`${proc.name} not ready within ${READY_TIMEOUT_MS} ms (${url}/readyz: ${last}); last output:\n${proc.logs.tail(40)}`);
}

// ---------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------

/** Clusters that are running, cleaned up synchronously if the process exits early. */
const running = new Set();
/** Private Redis Clusters of startRedisCluster, stopped synchronously if the process exits early. */
const runningRedisClusters = new Set();

/**
 * Starts a fresh deployment.
 *
 * cluster mode: a new database `sbtest_<rand>` (migrated by `switchboard-worker
 * migrate`), a new Redis prefix `sbtest:<rand>`, `gateways` gateway nodes and
 * `workers` workers. embedded mode: one gateway on a fresh DATA_DIR, no workers.
 * `env` is added to every process (after the harness's own variables).
 * `redisUrl` replaces REDIS_URL_IN_USE for this deployment (e.g. the URL of a private
 * Redis Cluster from startRedisCluster); its keys are cleaned up there.
 */
export async function startCluster({ gateways = 2, workers = 2, env = {}, redisUrl } = {}) {
  await auth.start();
  const id = randomHex(6);
  const cluster = new Cluster(id, redisUrl);
  running.add(cluster);
  try {
    await cluster.start({ gateways, workers, env });
  } catch (e) {
    await cluster.stop({ quiet: true }).catch(() => {});
    throw e;
  }
  return cluster;
}

class Cluster {
  constructor(id, redisUrl) {
    this.id = id;
    this.mode = MODE;
    this.redisUrl = MODE === 'cluster' ? (redisUrl || REDIS_URL_IN_USE) : null;
    this.db = MODE === 'cluster' ? `sbtest_${id}` : null;
    this.prefix = MODE === 'cluster' ? `sbtest:${id}` : null;
    this.databaseUrl = this.db ? `postgres://${PG_USER}@${PG_HOST}:${PG_PORT}/${this.db}` : null;
    this.dataDir = null;
    this.gateways = [];
    this.workers = [];
    this.urls = [];
    this.stopped = false;
    this.dbCreated = false;
    this.redisUsed = false;
    this.extraEnv = {};
  }

  /** Variables shared by every process of this deployment. */
  commonEnv() {
    const env = baseEnv();
    if (this.mode === 'cluster') {
      Object.assign(env, {
        REDIS_URL: this.redisUrl,
        DATABASE_URL: this.databaseUrl,
        REDIS_PREFIX: this.prefix,
        STREAM_PARTITIONS: '4',
        LEASE_TTL_MS: '1500',
      });
    } else {
      env.DATA_DIR = this.dataDir;
    }
    return Object.assign(env, this.extraEnv);
  }

  async start({ gateways, workers, env }) {
    this.extraEnv = Object.fromEntries(Object.entries(env).map(([k, v]) => [k, String(v)]));
    if (this.mode === 'cluster') {
      if (parseRedisUrl(this.redisUrl).cluster) await checkRedisCluster(this.redisUrl);
      // From here on keys may be written (and a Redis that was never reached is not cleaned).
      this.redisUsed = true;
      await psql(`CREATE DATABASE ${this.db}`);
      this.dbCreated = true;
      await this.migrate();
    } else {
      this.dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sbtest-'));
      gateways = 1;
      workers = 0;
    }
    // Workers first: they take their partition leases while the gateways boot.
    for (let i = 0; i < workers; i++) this.addWorker();
    await Promise.all(Array.from({ length: gateways }, (_, i) => this.startGateway(i)));
    this.urls = this.gateways.map((g) => g.url);
    // A worker that died at startup is a failure of the deployment, not of a test.
    for (const w of this.workers) {
      if (!w.alive) throw new Error(`${w.name} ${w.describeExit()} at startup; last output:\n${w.logs.tail(40)}`);
    }
  }

  async migrate() {
    const env = this.commonEnv();
    try {
      await execFileP(WORKER_BIN, ['migrate'], { env, timeout: 60_000 });
    } catch (e) {
      const why = e.code === 'ENOENT' ? `${WORKER_BIN} not found (build the binaries first: cargo build --bins)` : `${e.message}\n${e.stderr || ''}${e.stdout || ''}`;
      throw new Error(`switchboard-worker migrate failed: ${why}`);
    }
  }

  /** Starts gateway `i` on a free port and waits for /readyz (retries a port taken in between). */
  async startGateway(i) {
    let lastError;
    for (let attempt = 0; attempt < 3; attempt++) {
      const port = await freePort();
      const env = Object.assign(this.commonEnv(), {
        PORT: String(port),
        HOST: '127.0.0.1',
        NODE_ID: `gw-${i}-${randomHex(3)}`,
        AUTH_JWKS_URL: auth.jwksUrl,
        AUTH_ISSUER: ISSUER,
        AUTH_AUTHORIZED_PARTIES: AUTHORIZED_PARTY,
      }, this.extraEnv);
      const proc = new Proc(`gateway-${i}`, GATEWAY_BIN, [], env);
      proc.url = `http://127.0.0.1:${port}`;
      proc.port = port;
      try {
        await waitReady(proc, proc.url, env.NODE_ID);
        this.gateways[i] = proc;
        // A restarted gateway has a new port: url(i) follows it.
        if (i < this.urls.length) this.urls[i] = proc.url;
        return proc;
      } catch (e) {
        lastError = e;
        await proc.stop('SIGKILL', 1000);
        // Only a port stolen between freePort() and bind() is worth another try: this gateway
        // could not bind it, or another process's gateway answers on it.
        if (!e.portTaken && !/address (already )?in use|EADDRINUSE/i.test(proc.logs.tail(200))) break;
      }
    }
    throw lastError;
  }

  /** Starts one more worker (`env`: variables of this worker only, e.g. METRICS_PORT); returns its Proc. */
  addWorker(env = {}) {
    if (this.mode !== 'cluster') throw new Error('workers exist in cluster mode only');
    const i = this.workers.length;
    const own = Object.fromEntries(Object.entries(env).map(([k, v]) => [k, String(v)]));
    env = Object.assign(this.commonEnv(), { NODE_ID: `wk-${i}-${randomHex(3)}` }, this.extraEnv, own);
    const proc = new Proc(`worker-${i}`, WORKER_BIN, [], env);
    this.workers.push(proc);
    return proc;
  }

  /** Kills worker `i` on purpose (SIGKILL by default) and waits until it is gone. */
  async killWorker(i, signal = 'SIGKILL') {
    const w = this.workers[i];
    if (!w) throw new Error(`no worker ${i}`);
    return w.stop(signal, STOP_GRACE_MS);
  }

  /** Kills gateway `i` on purpose and waits until it is gone. */
  async killGateway(i, signal = 'SIGTERM') {
    const g = this.gateways[i];
    if (!g) throw new Error(`no gateway ${i}`);
    return g.stop(signal, STOP_GRACE_MS);
  }

  /** URL of gateway `i` (wrapping around, so embedded mode serves every index). */
  url(i = 0) {
    return this.urls[i % this.urls.length];
  }

  get processes() {
    return [...this.gateways, ...this.workers].filter(Boolean);
  }

  /** The output tail of every process, for a failure report. */
  logReport(lines = 60) {
    return this.processes
      .map((p) => `----- ${p.name} (pid ${p.pid}, ${p.describeExit()}) -----\n${p.logs.tail(lines) || '(no output)'}`)
      .join('\n');
  }

  printLogs(lines = 60) {
    const on = this.redisUrl ? `, ${this.redisUrl}` : '';
    process.stderr.write(`\n===== switchboard process output (cluster ${this.id}, ${this.mode}${on}) =====\n${this.logReport(lines)}\n`);
  }

  /**
   * Stops every process (SIGTERM, SIGKILL after 5 s), drops the database,
   * deletes the Redis keys and the data dir. Throws if a process had died
   * on its own during the run, or crashed/hung on SIGTERM.
   */
  async stop({ quiet = false } = {}) {
    if (this.stopped) return;
    this.stopped = true;
    closeAllSockets();
    const crashed = this.processes.filter((p) => !p.alive && !p.expectedExit);
    const results = await Promise.all(this.processes.map(async (p) => [p, await p.stop('SIGTERM', STOP_GRACE_MS)]));
    const badStops = crashed.length ? [] : results.filter(([p, r]) => r.forced || (r.code !== 0 && r.code !== null && !p.exit.error) || (r.signal && r.signal !== 'SIGTERM' && r.signal !== 'SIGKILL'));
    await this.cleanup();
    running.delete(this);
    if (quiet) return;
    if (crashed.length) {
      throw new Error(`process(es) died during the tests: ${crashed.map((p) => `${p.name} ${p.describeExit()}`).join(', ')}\n${this.logReport(80)}`);
    }
    if (badStops.length) {
      // A node that ignores SIGTERM or crashes on it: report it, do not fail the file.
      process.stderr.write(`warning: unclean shutdown: ${badStops.map(([p, r]) => `${p.name} ${r.forced ? 'did not exit within 5 s of SIGTERM' : p.describeExit()}`).join(', ')}\n`);
    }
  }

  async cleanup() {
    const errors = [];
    if (this.dbCreated) {
      await psql(`DROP DATABASE IF EXISTS ${this.db} WITH (FORCE)`).catch((e) => errors.push(e.message));
      this.dbCreated = false;
    }
    if (this.prefix && this.redisUsed) {
      await execFileP('bash', ['-c', redisCleanupCommand(this.redisUrl, this.prefix)], { timeout: 30_000 }).catch((e) => errors.push(`redis cleanup: ${e.stderr || e.message}`));
    }
    if (this.dataDir) fs.rmSync(this.dataDir, { recursive: true, force: true });
    if (errors.length) process.stderr.write(`warning: cleanup of cluster ${this.id}: ${errors.join('; ')}\n`);
  }

  /** Last-resort synchronous cleanup when the test process exits without stop(). */
  cleanupSync() {
    for (const p of this.processes) if (p.alive) p.child.kill('SIGKILL');
    if (this.dbCreated) spawnSync('psql', [...PSQL_ARGS, `DROP DATABASE IF EXISTS ${this.db} WITH (FORCE)`], { timeout: 10_000 });
    if (this.prefix && this.redisUsed) spawnSync('bash', ['-c', redisCleanupCommand(this.redisUrl, this.prefix)], { timeout: 10_000 });
    if (this.dataDir) fs.rmSync(this.dataDir, { recursive: true, force: true });
  }
}

function cleanupAllSync() {
  for (const c of running) c.cleanupSync();
  running.clear();
  // After the deployments: their key cleanup needs the Redis Cluster still up.
  for (const rc of runningRedisClusters) rc.stopSync();
  runningRedisClusters.clear();
}
process.on('exit', cleanupAllSync);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    cleanupAllSync();
    process.exit(130);
  });
}

// ---------------------------------------------------------------------------
// Redis Cluster (MODE=redis-cluster; scripts/redis-cluster does the work)
// ---------------------------------------------------------------------------

/** Fails fast, with the way out, when the Redis Cluster at `redisUrl` is down or not ok. */
async function checkRedisCluster(redisUrl) {
  let last = 'no seed node answers';
  for (const { host, port } of parseRedisUrl(redisUrl).nodes) {
    try {
      const { stdout } = await execFileP('redis-cli', ['-h', host, '-p', String(port), 'cluster', 'info'], { timeout: 5000 });
      if (/^cluster_state:ok/m.test(stdout)) return;
      last = `${host}:${port} says ${(/^cluster_state:\w+/m.exec(stdout) || [stdout.trim()])[0]}`;
    } catch (e) {
      last = `${host}:${port}: ${(e.stdout || e.stderr || e.message).trim()}`;
    }
  }
  throw new Error(`the Redis Cluster ${redisUrl} is not usable (${last}); start it with scripts/redis-cluster start`);
}

/**
 * Starts a private Redis Cluster (3 masters + 3 replicas) with `scripts/redis-cluster start`
 * on `basePort` (default: a free one, see freeRedisClusterBasePort) and a fresh directory,
 * for a test that kills its nodes without disturbing the shared one. Resolves with
 *   {url, basePort, ports, dir,
 *    killMasterOf(key) -> port of the SIGKILLed master owning key's slot,
 *    restart(port)     the killed node again, back as a replica (waits for the failover first),
 *    clusterOk()       true when every node that answers says cluster_state:ok and every slot's
 *                      master answers (the failover is over),
 *    stop()}
 * It is stopped at process exit at the latest; stopRedisCluster(rc) is rc.stop().
 */
export async function startRedisCluster({ basePort } = {}) {
  let lastError;
  // A random base can be taken between the check and redis-server's bind: retry elsewhere.
  for (let attempt = 0; attempt < 3; attempt++) {
    const base = basePort ?? (await freeRedisClusterBasePort());
    const rc = new RedisCluster(base, fs.mkdtempSync(path.join(os.tmpdir(), 'sbtest-redis-cluster-')));
    runningRedisClusters.add(rc);
    try {
      await rc.start();
      return rc;
    } catch (e) {
      lastError = e;
      await rc.stop().catch(() => {});
      if (basePort !== undefined || !/taken|address already in use|only \d of 6/i.test(e.message)) break;
    }
  }
  throw lastError;
}

/** Stops a Redis Cluster of startRedisCluster (its processes and directory). */
export function stopRedisCluster(rc) {
  return rc.stop();
}

class RedisCluster {
  constructor(basePort, dir) {
    this.basePort = basePort;
    this.dir = dir;
    this.ports = [0, 1, 2, 3, 4, 5].map((i) => basePort + i);
    this.url = null;
    this.stopped = false;
  }

  args(...rest) {
    return [...rest, '--base-port', String(this.basePort), '--dir', this.dir];
  }

  async script(...args) {
    try {
      return (await execFileP(REDIS_CLUSTER_SCRIPT, this.args(...args), { timeout: 90_000 })).stdout.trim();
    } catch (e) {
      throw new Error(`scripts/redis-cluster ${args.join(' ')} (base port ${this.basePort}) failed: ${(e.stderr || '').trim() || e.message}`);
    }
  }

  async start() {
    this.url = (await this.script('start')).split('\n').pop();
    return this;
  }

  /** SIGKILLs the master that owns `key`'s slot; resolves with its port. */
  async killMasterOf(key) {
    return Number((await this.script('kill-master-of', key)).split('\n').pop());
  }

  /** Starts a killed node again with its own config; resolves once it is back (as a replica). */
  async restart(port) {
    await this.script('restart', String(port));
  }

  /** `redis-cli -p <port> ...args` on one node; resolves with stdout, or null if the node does not answer. */
  async cli(port, ...args) {
    try {
      return (await execFileP('redis-cli', ['-h', REDIS_HOST, '-p', String(port), ...args], { timeout: 2000 })).stdout;
    } catch {
      return null;
    }
  }

  /**
   * True when the cluster serves every slot: each node that answers reports cluster_state:ok
   * and 16384 slots ok, and each master that holds slots answers. (Right after a kill the
   * others still call the dead master healthy for up to the node timeout, so cluster_state
   * alone would say ok before the failover.)
   */
  async clusterOk() {
    let nodes = null;
    for (const port of this.ports) {
      const info = await this.cli(port, 'cluster', 'info');
      if (info === null) continue; // a killed node
      if (!/^cluster_state:ok/m.test(info) || !/^cluster_slots_ok:16384/m.test(info)) return false;
      nodes ??= await this.cli(port, 'cluster', 'nodes');
    }
    if (!nodes) return false;
    const owners = nodes.split('\n').map((l) => l.split(' ')).filter((f) => /master/.test(f[2] || '') && f.length >= 9);
    for (const f of owners) {
      if (/fail/.test(f[2])) return false;
      const port = f[1].split('@')[0].split(':').pop();
      if (!/PONG/.test((await this.cli(port, 'ping')) || '')) return false;
    }
    return owners.length > 0;
  }

  async stop() {
    if (this.stopped) return;
    this.stopped = true;
    runningRedisClusters.delete(this);
    await this.script('stop');
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  stopSync() {
    if (this.stopped) return;
    this.stopped = true;
    spawnSync(REDIS_CLUSTER_SCRIPT, this.args('stop'), { timeout: 15_000 });
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * One deployment shared by the tests of a file: started in `before`, stopped
 * in `after`. Sockets opened by a test are closed after it. If any test of the
 * file failed, the output of every process is printed before the stop.
 *
 *   const sb = useCluster({gateways: 2, workers: 2});
 *   before(async () => { await sb.ready; ...file setup... });
 *   test('...', async () => { const url = sb.url(1); ... });
 */
export function useCluster(options = {}) {
  const ref = {
    cluster: null,
    url: (i = 0) => ref.cluster.url(i),
    get urls() {
      return ref.cluster.urls;
    },
  };
  let failed = false;
  let markReady;
  // Root-level `before` hooks of node:test start as they are registered, so a
  // file's own setup hook awaits `ref.ready` rather than relying on order.
  ref.ready = new Promise((resolve, reject) => {
    markReady = { resolve, reject };
  });
  ref.ready.catch(() => {}); // reported through the hook below
  before(async () => {
    try {
      ref.cluster = await startCluster(options);
      markReady.resolve(ref.cluster);
    } catch (e) {
      markReady.reject(e);
      throw e;
    }
  }, { timeout: 120_000 });
  afterEach((t) => {
    if (t.passed === false) failed = true;
    closeAllSockets();
  });
  after(async () => {
    closeAllSockets();
    if (!ref.cluster) return;
    if (failed) ref.cluster.printLogs();
    await ref.cluster.stop();
  }, { timeout: 60_000 });
  return ref;
}

/** For tests that need at least two nodes: skips them in embedded mode. Returns true if skipped. */
export function needsCluster(t) {
  if (MODE === 'embedded') {
    t.skip('needs a cluster');
    return true;
  }
  return false;
}

/** For tests of Redis Cluster behaviour: skips them unless MODE=redis-cluster. Returns true if skipped. */
export function needsRedisCluster(t) {
  if (!REDIS_CLUSTER) {
    t.skip('needs MODE=redis-cluster');
    return true;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Socket.IO clients
// ---------------------------------------------------------------------------

const liveSockets = new Set();

/** Disconnects every socket the harness created. */
export function closeAllSockets() {
  for (const s of liveSockets) s.disconnect();
  liveSockets.clear();
}

/**
 * Creates a socket (not yet connected) with an event recorder.
 *
 * options:
 *   userId, token   handshake auth {token: 'Bearer ' + token, userId}; without
 *                   `token`, a valid one is minted for userId (`tokenOptions`)
 *   bearer          false sends the token without the 'Bearer ' prefix
 *   auth            the exact handshake auth object (overrides the above);
 *                   `auth: null` sends none at all
 *   way             'namespace' (default): io(url + '/api/socket.io')
 *                   'path': io(url, {path: '/api/socket.io'})
 *   transports      e.g. ['websocket'] or ['polling']
 *   extraHeaders    HTTP headers of the handshake requests (both transports;
 *                   e.g. {'x-forwarded-for': '203.0.113.7'})
 */
export function createSocket(url, options = {}) {
  const { userId, way = 'namespace', transports = ['polling', 'websocket'], bearer = true, tokenOptions } = options;
  let handshakeAuth;
  if ('auth' in options) {
    handshakeAuth = options.auth === null ? undefined : options.auth;
  } else {
    const jwt = options.token !== undefined ? options.token : auth.token(userId, tokenOptions);
    handshakeAuth = { token: bearer ? `Bearer ${jwt}` : jwt, userId };
  }
  const common = { transports, reconnection: false, forceNew: true, autoConnect: false, timeout: 10_000 };
  if (handshakeAuth !== undefined) common.auth = handshakeAuth;
  if (options.extraHeaders) common.extraHeaders = options.extraHeaders;
  let socket;
  if (way === 'namespace') socket = io(url + SIO_PATH, common);
  else if (way === 'path') socket = io(url, { ...common, path: SIO_PATH });
  else throw new Error(`unknown way ${way}`);
  socket.userId = userId;
  attachRecorder(socket);
  liveSockets.add(socket);
  return socket;
}

/**
 * Connects and resolves with the socket once the Socket.IO `connect` event
 * fired (rejects on `connect_error` or after 10 s). `onConnect(socket)` runs
 * synchronously inside the `connect` handler.
 */
export function connect(url, options = {}) {
  const socket = createSocket(url, options);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`socket to ${url} (${options.way || 'namespace'}) did not connect within 10 s`)), 10_000);
    socket.once('connect', () => {
      clearTimeout(timer);
      if (options.onConnect) options.onConnect(socket);
      resolve(socket);
    });
    socket.once('connect_error', (err) => {
      clearTimeout(timer);
      reject(new Error(`connect_error from ${url}: ${err.message}${err.data ? ' ' + JSON.stringify(err.data) : ''}`));
    });
    socket.connect();
  });
}

/**
 * Connects as `userId` with a valid token and waits for `connection:success`.
 * The payload is kept as `socket.success`.
 */
export async function connectUser(url, userId, options = {}) {
  const socket = await connect(url, { ...options, userId });
  socket.success = await waitFor(socket, 'connection:success', null, options.timeoutMs || 10_000);
  return socket;
}

/** Records every event a socket receives, from its creation on. */
function attachRecorder(socket) {
  const rec = { events: [], listeners: new Set() };
  const record = (event, args) => {
    const entry = { event, args, payload: args[0], index: rec.events.length, at: Date.now() };
    rec.events.push(entry);
    for (const l of [...rec.listeners]) l(entry);
  };
  socket.onAny((event, ...args) => record(event, args));
  // Reserved events are not seen by onAny.
  socket.on('connect', () => record('connect', []));
  socket.on('connect_error', (err) => record('connect_error', [{ message: err.message, data: err.data }]));
  socket.on('disconnect', (reason, details) => record('disconnect', [reason, details]));
  socket.recorder = rec;
  return rec;
}

function recorderOf(socket) {
  if (!socket.recorder) throw new Error('socket was not created by the harness');
  return socket.recorder;
}

/** Index of the next event the socket will record (for "after this point" predicates). */
export function mark(socket) {
  return recorderOf(socket).events.length;
}

/** All recorded payloads of `event` (optionally filtered). */
export function received(socket, event, predicate = null) {
  return recorderOf(socket)
    .events.filter((e) => e.event === event && safeMatch(predicate, e))
    .map((e) => e.payload);
}

function safeMatch(predicate, entry) {
  if (!predicate) return true;
  try {
    return Boolean(predicate(entry.payload, entry));
  } catch {
    return false;
  }
}

function summarize(socket, n = 12) {
  const events = recorderOf(socket).events;
  if (!events.length) return '(nothing received)';
  const tail = events.slice(-n).map((e) => {
    const text = JSON.stringify(e.args.filter((a) => typeof a !== 'function'));
    return `${e.event} ${text && text.length > 300 ? text.slice(0, 300) + '…' : text}`;
  });
  return `${events.length} event(s), last: \n    ${tail.join('\n    ')}`;
}

/**
 * Resolves with the payload of the first `event` (recorded since the socket
 * was created) for which `predicate(payload, entry)` holds; rejects after
 * `timeoutMs` with a summary of what the socket did receive.
 */
export function waitFor(socket, event, predicate = null, timeoutMs = 5000) {
  const rec = recorderOf(socket);
  const hit = rec.events.find((e) => e.event === event && safeMatch(predicate, e));
  if (hit) return Promise.resolve(hit.payload);
  return new Promise((resolve, reject) => {
    const listener = (entry) => {
      if (entry.event === event && safeMatch(predicate, entry)) {
        clearTimeout(timer);
        rec.listeners.delete(listener);
        resolve(entry.payload);
      }
    };
    const timer = setTimeout(() => {
      rec.listeners.delete(listener);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for "${event}"${predicate ? ' (matching predicate)' : ''} on socket of ${socket.userId ?? '?'}; ${summarize(socket)}`));
    }, timeoutMs);
    rec.listeners.add(listener);
  });
}

/**
 * Resolves with `{event, payload}` of the first recorded event that matches
 * any of `specs` (`[[event, predicate], ...]`); rejects after `timeoutMs`.
 */
export function waitForAny(socket, specs, timeoutMs = 5000) {
  const rec = recorderOf(socket);
  const matches = (entry) => specs.some(([event, predicate]) => entry.event === event && safeMatch(predicate, entry));
  const hit = rec.events.find(matches);
  if (hit) return Promise.resolve({ event: hit.event, payload: hit.payload });
  return new Promise((resolve, reject) => {
    const listener = (entry) => {
      if (matches(entry)) {
        clearTimeout(timer);
        rec.listeners.delete(listener);
        resolve({ event: entry.event, payload: entry.payload });
      }
    };
    const timer = setTimeout(() => {
      rec.listeners.delete(listener);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for any of ${specs.map((s) => s[0]).join(', ')} on socket of ${socket.userId ?? '?'}; ${summarize(socket)}`));
    }, timeoutMs);
    rec.listeners.add(listener);
  });
}

/**
 * Emits `message:send` and resolves with its final outcome as seen in the
 * events (not the ack): `{status: 'DELIVERED'|'FAILED', payload}`, where
 * payload is the message:delivered / message:failed event. Matches on the
 * payload's tempId, among events recorded after the emit.
 */
export async function sendAndWait(socket, payload, timeoutMs = 10_000) {
  const from = mark(socket);
  const tempId = payload?.tempId ?? null;
  socket.emit('message:send', payload);
  const after = (p, e) => e.index >= from && (p.tempId ?? null) === tempId;
  const { event, payload: result } = await waitForAny(socket, [
    ['message:delivered', (p, e) => after(p, e) && p.status === 'DELIVERED'],
    ['message:failed', after],
  ], timeoutMs);
  return { status: event === 'message:failed' ? 'FAILED' : 'DELIVERED', payload: result };
}

/**
 * Polls `condition()` every 50 ms until it returns a truthy value (resolved
 * with it); rejects after `timeoutMs` with `describe()` in the message.
 */
export async function waitUntil(condition, timeoutMs = 5000, describe = () => '') {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms ${describe()}`);
    await sleep(50);
  }
}

/** Resolves once `count` matching `event`s were recorded; with the list of their payloads. */
export function waitForCount(socket, event, count, predicate = null, timeoutMs = 5000) {
  const rec = recorderOf(socket);
  const have = () => received(socket, event, predicate);
  if (have().length >= count) return Promise.resolve(have());
  return new Promise((resolve, reject) => {
    const listener = (entry) => {
      if (entry.event === event && have().length >= count) {
        clearTimeout(timer);
        rec.listeners.delete(listener);
        resolve(have());
      }
    };
    const timer = setTimeout(() => {
      rec.listeners.delete(listener);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${count} "${event}" on socket of ${socket.userId ?? '?'} (got ${have().length}); ${summarize(socket, 4)}`));
    }, timeoutMs);
    rec.listeners.add(listener);
  });
}

/** An array of the payloads of `event`: those recorded so far, then each new one as it arrives. */
export function collect(socket, event) {
  const rec = recorderOf(socket);
  const list = received(socket, event);
  rec.listeners.add((entry) => {
    if (entry.event === event) list.push(entry.payload);
  });
  return list;
}

/** Emits with an acknowledgement and resolves with the server's answer (rejects after `timeout` ms). */
export function emitAck(socket, event, payload, timeout = 5000) {
  return socket.timeout(timeout).emitWithAck(event, payload);
}

// ---------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------

/**
 * Calls the REST API. `token` is a JWT sent as `Authorization: Bearer <token>`
 * (`authorization` sets the header verbatim); `body` is sent as JSON,
 * `rawBody` as is. Resolves with {status, body (parsed JSON or null), text, headers}.
 */
export async function api(url, method, pathname, { token, authorization, body, rawBody, headers = {} } = {}) {
  const h = { ...headers };
  if (authorization !== undefined) h.authorization = authorization;
  else if (token !== undefined) h.authorization = `Bearer ${token}`;
  let payload;
  if (rawBody !== undefined) {
    payload = rawBody;
    h['content-type'] = h['content-type'] || 'application/json';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    h['content-type'] = 'application/json';
  }
  const res = await fetch(url + pathname, { method, headers: h, body: payload, signal: AbortSignal.timeout(15_000) });
  const text = await res.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null;
  }
  return { status: res.status, body: parsed, text, headers: res.headers };
}

/** The list in a list response: a bare array, or the array under `key` of an object. */
export function listOf(body, key) {
  if (Array.isArray(body)) return body;
  if (body && Array.isArray(body[key])) return body[key];
  throw new Error(`expected a JSON array (or {${key}: [...]}), got ${JSON.stringify(body)?.slice(0, 300)}`);
}

/** Creates a channel through REST as `userId`; resolves with the created channel. */
export async function createChannel(url, userId, name = `ch-${randomHex(3)}`, isPrivate = false) {
  const res = await api(url, 'POST', '/api/channels', { token: auth.token(userId), body: { name, isPrivate } });
  if (res.status !== 201) throw new Error(`POST /api/channels as ${userId}: ${res.status} ${res.text}`);
  return res.body;
}

/** Adds `userId` to a channel through REST as `asUserId`; resolves with the response. */
export async function addMember(url, asUserId, channelId, userId) {
  return api(url, 'POST', `/api/channels/${encodeURIComponent(channelId)}/members`, { token: auth.token(asUserId), body: { userId } });
}

/** GET history as `userId`; resolves with the response (list in `.list` when 200). */
export async function history(url, userId, channelId, { limit, before } = {}) {
  const q = new URLSearchParams();
  if (limit !== undefined) q.set('limit', String(limit));
  if (before !== undefined) q.set('before', before);
  const qs = q.toString();
  const res = await api(url, 'GET', `/api/channels/${encodeURIComponent(channelId)}/messages${qs ? '?' + qs : ''}`, { token: auth.token(userId) });
  if (res.status === 200) res.list = listOf(res.body, 'messages');
  return res;
}

/** Every message of a channel, oldest first, paging through history (100 a page). */
export async function fullHistory(url, userId, channelId) {
  const all = [];
  let before;
  for (;;) {
    const res = await history(url, userId, channelId, { limit: 100, before });
    if (res.status !== 200) throw new Error(`history: ${res.status} ${res.text}`);
    all.push(...res.list);
    if (res.list.length < 100) break;
    before = res.list[res.list.length - 1].id;
  }
  return all.reverse();
}
