/**
 * A real distributed S3 store for tests: a local Garage cluster of three storage nodes with
 * replication factor 3 (consistent mode: reads and writes need 2 of 3 nodes), each node its own
 * process with its own folders and ports on 127.0.0.1. Node 0 is the gateway the S3 endpoint
 * points at; any other node can be killed and the cluster stays writable.
 *
 * The binary is the one `scripts/setup.sh` builds into its cache (or `$PVE_BACKUP_GARAGE`); a
 * missing binary fails the test with how to install it, never skips it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { s3Request, type S3Target } from './s3.js';

/** The Garage version `scripts/setup.sh` installs. */
export const GARAGE_VERSION = '2.5.0';
const CACHED_GARAGE = `/var/cache/pve-backup-provider/garage-${GARAGE_VERSION}/bin/garage`;

/** One storage node of the cluster. */
export interface GarageNode {
  index: number;
  /** Garage's node id (hex public key), known once the node has started */
  id: string;
  rpcPort: number;
  s3Port: number;
  adminPort: number;
  /** its config, meta/ and data/ folders and its log (`garage.log`) */
  dir: string;
  /** the running process, or null while stopped */
  process: ChildProcess | null;
}

/** A running cluster, its bucket and a key with read and write access on it. */
export interface S3Cluster extends S3Target {
  bucket: string;
  nodes: GarageNode[];
  /** Kills node `i` (SIGKILL: a crash, unless told otherwise) and waits until it has exited. */
  stopNode(i: number, signal?: NodeJS.Signals): Promise<void>;
  /** Starts node `i` again on its ports and folders and waits until every running node sees it. */
  startNode(i: number): Promise<void>;
  /** Stops the gateway (SIGTERM), runs `whileDown` if given, starts it again and waits for it. */
  restartGateway(whileDown?: () => Promise<void>): Promise<void>;
  /** Creates a bucket that the cluster's key can read and write. */
  createBucket(name: string): Promise<void>;
  /** A new key that may only read `bucket` (a verifier's or an auditor's credentials). */
  createReadOnlyKey(bucket: string): Promise<{ accessKeyId: string; secretAccessKey: string }>;
  /** Sets the bucket's size quota in bytes (null: none); puts beyond it are refused with 403. */
  setQuota(bucket: string, maxBytes: number | null): Promise<void>;
  /** Kills every node and removes the cluster's folder; safe to call twice. */
  stop(): Promise<void>;
}

/**
 * The chunk store's options (`S3StoreOptions`) for the cluster's bucket, plain http as the
 * cluster serves it. (Typed here without importing lib/: benchmarks compile this file alone.)
 */
export function clusterStoreOptions(cluster: S3Cluster, prefix?: string): S3Target & { bucket: string; prefix?: string; allowHttp: true } {
  return { endpoint: cluster.endpoint, region: cluster.region, bucket: cluster.bucket, ...(prefix !== undefined ? { prefix } : {}), accessKeyId: cluster.accessKeyId, secretAccessKey: cluster.secretAccessKey, allowHttp: true };
}

/** The Garage binary, or an error saying how to install it. */
export function garageBinary(): string {
  const bin = process.env['PVE_BACKUP_GARAGE'] ?? CACHED_GARAGE;
  if (!existsSync(bin)) {
    throw new Error(
      `Garage not found at ${bin}: run \`bash scripts/setup.sh\` (builds Garage ${GARAGE_VERSION} into ` +
        `/var/cache/pve-backup-provider, once), or set PVE_BACKUP_GARAGE to a garage ${GARAGE_VERSION} binary`,
    );
  }
  return bin;
}

/** `n` distinct free TCP ports on 127.0.0.1 (held open together, then released). */
async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, () =>
      new Promise<ReturnType<typeof createServer>>((resolve, reject) => {
        const server = createServer();
        server.once('error', reject);
        server.listen(0, '127.0.0.1', () => resolve(server));
      }),
    ),
  );
  const ports = servers.map((s) => (s.address() as AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** An error that ends a wait at once instead of being retried. */
class Fatal extends Error {}

/**
 * Polls `probe` until it returns a value other than undefined, or fails after `timeoutMs`; errors
 * are retried (a server not listening yet) unless they are `Fatal`.
 */
async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (err) {
      if (err instanceof Fatal) throw err;
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs / 1000} s${last ? ` (last error: ${String(last)})` : ''}`);
    await sleep(200);
  }
}

/**
 * Starts a three-node Garage cluster in a fresh private folder, with a bucket `pbp-test` and a key
 * on it, and returns once the S3 endpoint (node 0) serves the bucket. Call `stop()` in afterAll;
 * the nodes are also killed and the folder removed if the test process exits first.
 */
export async function startS3Cluster(): Promise<S3Cluster> {
  const bin = garageBinary();
  const dir = mkdtempSync(join(tmpdir(), 'pbp-garage-')); // mode 0700
  const rpcSecret = randomBytes(32).toString('hex');
  const adminToken = randomBytes(32).toString('base64url');
  const region = 'garage';
  const ports = await freePorts(9);
  const nodes: GarageNode[] = [0, 1, 2].map((index) => {
    const nodeDir = join(dir, `node${index}`);
    const [rpcPort, s3Port, adminPort] = ports.slice(index * 3, index * 3 + 3) as [number, number, number];
    for (const d of [nodeDir, join(nodeDir, 'meta'), join(nodeDir, 'data')]) mkdirSync(d, { mode: 0o700 });
    const config = `metadata_dir = "${nodeDir}/meta"
data_dir = "${nodeDir}/data"
db_engine = "lmdb"
replication_factor = 3
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:${rpcPort}"
rpc_public_addr = "127.0.0.1:${rpcPort}"
rpc_secret = "${rpcSecret}"

[s3_api]
s3_region = "${region}"
api_bind_addr = "127.0.0.1:${s3Port}"

[admin]
api_bind_addr = "127.0.0.1:${adminPort}"
admin_token = "${adminToken}"
`;
    writeFileSync(join(nodeDir, 'garage.toml'), config, { mode: 0o600 });
    return { index, id: '', rpcPort, s3Port, adminPort, dir: nodeDir, process: null };
  });

  const killAll = (): void => {
    for (const node of nodes) node.process?.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', killAll);

  /** One admin API v2 call on `node`; a non-2xx answer throws with its body. */
  async function admin<T>(node: GarageNode, method: 'GET' | 'POST', call: string, body?: unknown): Promise<T> {
    const res = await fetch(`http://127.0.0.1:${node.adminPort}/v2/${call}`, {
      method,
      headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: AbortSignal.timeout(10_000),
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`garage admin ${call} on node ${node.index}: HTTP ${res.status} ${text}`);
    return JSON.parse(text) as T;
  }

  function logTail(node: GarageNode): string {
    const log = join(node.dir, 'garage.log');
    return existsSync(log) ? readFileSync(log, 'utf8').split('\n').slice(-15).join('\n') : '(no log)';
  }

  /** Spawns node's server and waits until its admin API answers; returns its node id. */
  async function spawnNode(node: GarageNode): Promise<string> {
    const log = openSync(join(node.dir, 'garage.log'), 'a', 0o600);
    const child = spawn(bin, ['-c', join(node.dir, 'garage.toml'), 'server'], {
      stdio: ['ignore', log, log],
      env: { ...process.env, RUST_LOG: 'garage=info' },
    });
    closeSync(log);
    node.process = child;
    child.once('exit', () => {
      if (node.process === child) node.process = null;
    });
    return waitFor(`garage node ${node.index} to answer`, async () => {
      if (node.process !== child) throw new Fatal(`garage node ${node.index} exited:\n${logTail(node)}`);
      const info = await admin<{ success: Record<string, { nodeId: string }> }>(node, 'GET', 'GetNodeInfo?node=self');
      return Object.values(info.success)[0]?.nodeId;
    });
  }

  /** Waits until every running node sees all running nodes up and quorum on every partition. */
  async function waitHealthy(): Promise<void> {
    const running = nodes.filter((n) => n.process);
    for (const node of running) {
      await waitFor(`garage node ${node.index} to see ${running.length} storage nodes up`, async () => {
        const h = await admin<{ storageNodesUp: number; partitions: number; partitionsQuorum: number }>(node, 'GET', 'GetClusterHealth');
        return h.storageNodesUp >= running.length && h.partitionsQuorum === h.partitions ? true : undefined;
      });
    }
  }

  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    await Promise.all(nodes.map((_, i) => stopNode(i)));
    process.off('exit', killAll);
    rmSync(dir, { recursive: true, force: true });
  };

  async function stopNode(i: number, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = nodes[i]!.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }

  const gateway = nodes[0]!;
  let key = { accessKeyId: '', secretAccessKey: '' };
  const cluster: S3Cluster = {
    endpoint: `http://127.0.0.1:${gateway.s3Port}`,
    region,
    bucket: 'pbp-test',
    get accessKeyId() {
      return key.accessKeyId;
    },
    get secretAccessKey() {
      return key.secretAccessKey;
    },
    nodes,
    stopNode,
    async startNode(i) {
      const node = nodes[i]!;
      if (node.process) return;
      await spawnNode(node);
      // Peers retry a lost node with a growing backoff (up to a minute): have each running peer
      // connect to it now, rather than wait.
      const others = nodes.filter((n) => n !== node && n.process);
      await Promise.all(others.map((n) => admin(n, 'POST', 'ConnectClusterNodes', [`${node.id}@127.0.0.1:${node.rpcPort}`])));
      await waitHealthy();
    },
    async restartGateway(whileDown) {
      await stopNode(0, 'SIGTERM');
      await whileDown?.();
      await cluster.startNode(0);
    },
    async createBucket(name) {
      const bucket = await admin<{ id: string }>(gateway, 'POST', 'CreateBucket', { globalAlias: name });
      await admin(gateway, 'POST', 'AllowBucketKey', {
        bucketId: bucket.id,
        accessKeyId: key.accessKeyId,
        permissions: { read: true, write: true, owner: true },
      });
    },
    async createReadOnlyKey(bucket) {
      const created = await admin<{ accessKeyId: string; secretAccessKey: string }>(gateway, 'POST', 'CreateKey', { name: `pbp-read-${randomBytes(4).toString('hex')}` });
      const { id } = await admin<{ id: string }>(gateway, 'GET', `GetBucketInfo?globalAlias=${encodeURIComponent(bucket)}`);
      await admin(gateway, 'POST', 'AllowBucketKey', { bucketId: id, accessKeyId: created.accessKeyId, permissions: { read: true, write: false, owner: false } });
      return { accessKeyId: created.accessKeyId, secretAccessKey: created.secretAccessKey };
    },
    async setQuota(bucket, maxBytes) {
      const { id } = await admin<{ id: string }>(gateway, 'GET', `GetBucketInfo?globalAlias=${encodeURIComponent(bucket)}`);
      await admin(gateway, 'POST', `UpdateBucket?id=${id}`, { quotas: { maxSize: maxBytes, maxObjects: null } });
    },
    stop,
  };

  try {
    const ids = await Promise.all(nodes.map(spawnNode));
    nodes.forEach((n, i) => (n.id = ids[i]!));
    const connected = await admin<Array<{ success: boolean; error: string | null }>>(
      gateway,
      'POST',
      'ConnectClusterNodes',
      nodes.slice(1).map((n) => `${n.id}@127.0.0.1:${n.rpcPort}`),
    );
    const failed = connected.find((c) => !c.success);
    if (failed) throw new Error(`garage: connecting the nodes failed: ${failed.error}`);
    // one zone per node, 1 GB each: with replication factor 3, every partition on every node
    const roles = nodes.map((n) => ({ id: n.id, zone: `z${n.index}`, capacity: 1e9, tags: [] }));
    const layout = await admin<{ version: number }>(gateway, 'POST', 'UpdateClusterLayout', { roles });
    await admin(gateway, 'POST', 'ApplyClusterLayout', { version: layout.version + 1 });
    await waitHealthy();

    const created = await admin<{ accessKeyId: string; secretAccessKey: string }>(gateway, 'POST', 'CreateKey', { name: 'pbp-test' });
    key = { accessKeyId: created.accessKeyId, secretAccessKey: created.secretAccessKey };
    await cluster.createBucket(cluster.bucket);
    await waitFor('the S3 endpoint to serve the bucket', async () => {
      const res = await s3Request(cluster, 'GET', `/${cluster.bucket}`, { query: { 'list-type': '2' } });
      return res.status === 200 ? true : undefined;
    });
  } catch (err) {
    const logs = nodes.map((n) => `--- node ${n.index} log:\n${logTail(n)}`).join('\n');
    await stop();
    throw new Error(`starting the Garage cluster failed: ${(err as Error).message}\n${logs}`, { cause: err });
  }
  return cluster;
}
