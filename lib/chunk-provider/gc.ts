/**
 * Garbage collection of a chunk store, safe while backups run (docs/chunk-store.md, "Garbage
 * collection"). S3 has neither access times nor locks, so a chunk no index names is not deleted
 * by the run that finds it: it becomes a *fossil* (moved to `fossils/…<digest>.<collection>`),
 * and a later run deletes it once every backup that was running meanwhile has finished, or
 * brings it back if one of them named it. Readers find fossils (`get_chunk` in the core), so
 * no backup that finishes ever misses a chunk.
 *
 * One run, in this order (the order is what makes it safe; the document explains why):
 * 1. hold `gc/running.json` (the store's clock: its `LastModified`);
 * 2. read the writer records (A; stale ones removed), then list `backups/` and mark every chunk
 *    an index names, then read the writer records again (B);
 * 3. earlier collections: delete or restore the fossils of each whose writers are not in A;
 *    complete one a run left half-way;
 * 4. remove backup folders without a manifest whose backup is not running (B);
 * 5. make fossils of the unmarked chunks older than the cutoff, recording the writers of A, B
 *    and of the end of the moves.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';

import { eachLimit } from '../concurrency.js';
import { CancelledError } from '../errors.js';
import { native } from '../native.js';
import type { LogFunction } from '../provider/api.js';
import { ChunkBackupError, ChunkStoreError, fromNative } from './errors.js';
import { chunkKey, digestOfKey, MANIFEST, WRITER_HEARTBEAT_MS, WRITER_STALE_SECONDS, type ChunkStore, type StoredWriter } from './store.js';

const RUNNING = 'gc/running.json';
/** How far before the oldest running backup's start a chunk must be to become a fossil (clocks differ). */
const CUTOFF_MARGIN_SECONDS = 10 * 60;
const CONCURRENCY = 16;

/** Options of {@link collectGarbage}. */
export interface GcOptions {
  /** Report what would be done; change nothing. */
  dryRun?: boolean;
  log?: LogFunction;
  signal?: AbortSignal;
  /**
   * Seconds a chunk must predate the oldest running backup (or the run) to become a fossil
   * (default 600: writers' clocks against the store's). Safety does not depend on it.
   */
  cutoffMarginSeconds?: number;
  /** @internal Seconds without a heartbeat after which a writer is dead (default {@link WRITER_STALE_SECONDS}). */
  staleAfterSeconds?: number;
}

/** A collection's record `gc/<id>.json`. */
interface CollectionRecord {
  id: string;
  /** The store's time at the run's start, Unix seconds. */
  started: number;
  /** `fossilizing` while (or if a run stopped while) chunks are moved; `fossils` after. */
  state: 'fossilizing' | 'fossils';
  /** The writer records (keys) of backups running while the fossils were made. */
  writers: string[];
}

/** What a run did (or, with `dryRun`, would do). */
export interface GcReport {
  dryRun: boolean;
  /** Index objects read. */
  indexes: number;
  /** Distinct chunks they name. */
  chunksMarked: number;
  /** Chunk objects in `chunks/`. */
  chunks: number;
  /** This run's fossils: unmarked chunks older than the cutoff, moved aside. */
  fossilized: { collection: string | null; chunks: number; bytes: number };
  /** Earlier collections settled: fossils brought back (a backup names them) and deleted. */
  finalized: Array<{ collection: string; restored: number; deleted: number; bytes: number }>;
  /** Earlier collections still waiting for backups that were running when they were made. */
  pending: Array<{ collection: string; waitingFor: number }>;
  /** Backup folders without a manifest that no running backup needs, removed. */
  removedBackups: string[];
  /** Writer records of dead backups (no heartbeat for 15 minutes), removed. */
  staleWriters: string[];
}

/** `fossils/<d[0..2]>/<d[2..4]>/<d>.<collection>`. */
function fossilKey(hex: string, collection: string): string {
  return `fossils/${hex.slice(0, 2)}/${hex.slice(2, 4)}/${hex}.${collection}`;
}

function checkSignal(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new CancelledError('garbage collection cancelled', { cause: signal.reason });
}

/**
 * Holds `gc/running.json` for the run, rewritten every minute. Refused while another run's is
 * fresh. Not atomic (S3 has no conditional write here): two runs started in the same second can
 * both go on; the protocol stays safe, the work is done twice.
 */
async function holdLock(store: ChunkStore): Promise<{ started: number; release: () => Promise<void> }> {
  const objects = store.objects;
  const body = Buffer.from(`${JSON.stringify({ host: os.hostname(), pid: process.pid, id: randomBytes(8).toString('hex') })}\n`);
  const held = await objects.head(RUNNING);
  if (held) {
    const probe = `gc/clock-${randomBytes(8).toString('hex')}`;
    await objects.put(probe, Buffer.alloc(0));
    const now = (await objects.head(probe))?.modified ?? Math.floor(Date.now() / 1000);
    await objects.delete(probe);
    if (now - held.modified <= WRITER_STALE_SECONDS) {
      const who = (await objects.get(RUNNING))?.toString('utf8').trim() ?? '';
      throw new ChunkStoreError('ERR_GC_RUNNING', `a garbage collection of ${store} is running (${RUNNING}: ${who}); try again when it is over`);
    }
  }
  await objects.put(RUNNING, body);
  const mine = await objects.get(RUNNING);
  const started = (await objects.head(RUNNING))?.modified;
  if (!mine?.equals(body) || started === undefined) throw new ChunkStoreError('ERR_GC_RUNNING', `another garbage collection of ${store} started at the same time`);
  const timer = setInterval(() => void objects.put(RUNNING, body).catch(() => undefined), WRITER_HEARTBEAT_MS);
  timer.unref();
  return {
    started,
    release: async () => {
      clearInterval(timer);
      if ((await objects.get(RUNNING))?.equals(body)) await objects.delete(RUNNING);
    },
  };
}

/**
 * Every chunk an index under `backups/` names (with a manifest or without: a running backup's
 * index counts). An index that cannot be read stops the run: a chunk it names must not become
 * a fossil.
 */
async function mark(store: ChunkStore, listed: ReadonlyArray<{ key: string }>, signal: AbortSignal | undefined): Promise<{ marked: Set<string>; indexes: number }> {
  const marked = new Set<string>();
  const keys = listed.map((o) => o.key).filter((k) => k.endsWith('.fidx') || k.endsWith('.didx'));
  let indexes = 0;
  await eachLimit(keys, CONCURRENCY, async (key) => {
    checkSignal(signal);
    const data = await store.objects.get(key);
    if (data === null) return; // removed since the listing: by a deletion no running backup depended on
    let digests: Buffer;
    try {
      digests = native.chunkIndexDigests(data, key);
    } catch (err) {
      const e = fromNative(err);
      throw new ChunkBackupError('ERR_BACKUP_CORRUPT', `garbage collection stopped before removing anything: ${store}/${key} cannot be read (${(e as Error).message}); verify or delete that backup first`, { file: key, cause: e });
    }
    for (let i = 0; i < digests.length; i += 32) marked.add(digests.toString('hex', i, i + 32));
    indexes++;
  });
  return { marked, indexes };
}

async function readCollections(store: ChunkStore): Promise<CollectionRecord[]> {
  const out: CollectionRecord[] = [];
  for (const o of await store.objects.list('gc/')) {
    if (o.key === RUNNING || !o.key.endsWith('.json')) continue;
    const data = await store.objects.get(o.key);
    if (data === null) continue;
    try {
      const c = JSON.parse(data.toString('utf8')) as CollectionRecord;
      if (typeof c.id === 'string' && Array.isArray(c.writers) && (c.state === 'fossils' || c.state === 'fossilizing')) out.push(c);
    } catch {
      // not ours to judge: left alone, and its fossils with it
    }
  }
  return out;
}

const writeCollection = (store: ChunkStore, c: CollectionRecord): Promise<void> => store.objects.put(`gc/${c.id}.json`, Buffer.from(`${JSON.stringify(c)}\n`));

/**
 * Collects the garbage of a chunk store: chunks no backup names, and what dead or failed backups
 * left. See the module documentation and docs/chunk-store.md for the protocol.
 * @throws {@link ChunkStoreError} `ERR_GC_RUNNING`, store errors; {@link ChunkBackupError}
 *   `ERR_BACKUP_CORRUPT` (an index that cannot be read: nothing was moved or deleted).
 */
export async function collectGarbage(store: ChunkStore, o: GcOptions = {}): Promise<GcReport> {
  const log = o.log ?? (() => undefined);
  const dryRun = o.dryRun === true;
  const objects = store.objects;
  const lock = dryRun ? undefined : await holdLock(store);
  const t0 = lock?.started ?? Math.floor(Date.now() / 1000);
  const report: GcReport = { dryRun, indexes: 0, chunksMarked: 0, chunks: 0, fossilized: { collection: null, chunks: 0, bytes: 0 }, finalized: [], pending: [], removedBackups: [], staleWriters: [] };
  try {
    const staleAfter = o.staleAfterSeconds ?? WRITER_STALE_SECONDS;
    const isLive = (w: StoredWriter): boolean => t0 - w.modified <= staleAfter;
    const live = (ws: StoredWriter[]): StoredWriter[] => ws.filter(isLive);
    const dropStale = async (ws: StoredWriter[]): Promise<void> => {
      for (const w of ws.filter((x) => !isLive(x))) {
        if (!dryRun) await objects.delete(w.key);
        if (!report.staleWriters.includes(w.key)) report.staleWriters.push(w.key);
      }
    };
    // a dead backup's record goes before anything is marked: should the backup wake up, it
    // finds its record gone when it checks before and after writing its manifest
    const writersA = await store.writers();
    await dropStale(writersA);
    const liveA = live(writersA);
    const collections = await readCollections(store);
    const backups = await objects.list('backups/');
    const { marked, indexes } = await mark(store, backups, o.signal);
    const writersB = await store.writers();
    const liveB = live(writersB);
    Object.assign(report, { indexes, chunksMarked: marked.size });
    log('info', `marked ${marked.size} chunks named by ${indexes} indexes; ${liveB.length} backups running`);

    // earlier collections
    const fossils = collections.length > 0 ? await objects.list('fossils/') : [];
    for (const c of collections) {
      checkSignal(o.signal);
      if (c.state === 'fossilizing') {
        // a run stopped while moving: every backup running now may have taken one of its chunks
        if (!dryRun) await writeCollection(store, { ...c, state: 'fossils', writers: [...new Set([...c.writers, ...liveB.map((w) => w.key)])] });
        report.pending.push({ collection: c.id, waitingFor: liveB.length });
        continue;
      }
      const waitingFor = c.writers.filter((k) => liveA.some((w) => w.key === k)).length;
      if (waitingFor > 0) {
        report.pending.push({ collection: c.id, waitingFor });
        continue;
      }
      const done = { collection: c.id, restored: 0, deleted: 0, bytes: 0 };
      const mine = fossils.filter((f) => f.key.endsWith(`.${c.id}`));
      await eachLimit(mine, CONCURRENCY, async (f) => {
        checkSignal(o.signal);
        const hex = digestOfKey(f.key);
        if (marked.has(hex)) {
          // a backup running when it was moved took it by its existence: it goes back, unless a
          // later backup stored it again: that copy is sound as far as anyone knows, the fossil
          // was never checked (a damaged one copied over it would be the only copy left)
          if (!dryRun) {
            const chunk = chunkKey(Buffer.from(hex, 'hex'));
            if ((await objects.head(chunk)) === null) await objects.copy(f.key, chunk);
            await objects.delete(f.key);
          }
          done.restored++;
        } else {
          if (!dryRun) await objects.delete(f.key);
          done.deleted++;
          done.bytes += f.size;
        }
      });
      if (!dryRun) await objects.delete(`gc/${c.id}.json`);
      report.finalized.push(done);
      log('info', `collection ${c.id}: ${done.deleted} chunks deleted (${done.bytes} bytes), ${done.restored} brought back`);
    }

    // folders without a manifest whose backup is not running: failed, cancelled or dead
    const folders = new Map<string, { volname: string; keys: string[]; manifest: boolean }>();
    for (const b of backups) {
      const parts = b.key.split('/');
      if (parts.length !== 4) continue;
      const volname = `backup/${parts[1]}/${parts[2]}`;
      const f = folders.get(volname) ?? { volname, keys: [], manifest: false };
      f.keys.push(b.key);
      if (parts[3] === MANIFEST) f.manifest = true;
      folders.set(volname, f);
    }
    const needed = new Set(liveB.map((w) => w.record.volname));
    for (const f of folders.values()) {
      if (f.manifest || needed.has(f.volname)) continue;
      // completed after the listing, its writer record gone before B: the manifest is there now
      if ((await objects.head(`backups/${f.volname.slice('backup/'.length)}/${MANIFEST}`)) !== null) continue;
      if (!dryRun) for (const k of f.keys) await objects.delete(k);
      report.removedBackups.push(f.volname);
    }
    await dropStale(writersB);

    // this run's fossils
    checkSignal(o.signal);
    const cutoff = Math.min(t0, ...liveA.map((w) => w.record.started)) - (o.cutoffMarginSeconds ?? CUTOFF_MARGIN_SECONDS);
    const chunks = await objects.list('chunks/');
    report.chunks = chunks.length;
    const unused = chunks.filter((c) => !marked.has(digestOfKey(c.key)) && c.modified < cutoff);
    report.fossilized.chunks = unused.length;
    report.fossilized.bytes = unused.reduce((n, c) => n + c.size, 0);
    if (unused.length > 0 && !dryRun) {
      const c: CollectionRecord = { id: `${t0}-${randomBytes(4).toString('hex')}`, started: t0, state: 'fossilizing', writers: [...new Set([...liveA, ...liveB].map((w) => w.key))] };
      report.fossilized.collection = c.id;
      await writeCollection(store, c);
      await eachLimit(unused, CONCURRENCY, async (chunk) => {
        checkSignal(o.signal);
        if (await objects.copy(chunk.key, fossilKey(digestOfKey(chunk.key), c.id))) await objects.delete(chunk.key);
      });
      // a backup that started during the moves may have found a chunk just before it moved
      const end = live(await store.writers());
      await writeCollection(store, { ...c, state: 'fossils', writers: [...new Set([...c.writers, ...end.map((w) => w.key)])] });
    }
    log('info', `${unused.length} unused chunks (${report.fossilized.bytes} bytes) ${dryRun ? 'would become' : 'became'} fossils, deleted by a later run`);
    return report;
  } finally {
    await lock?.release();
  }
}
