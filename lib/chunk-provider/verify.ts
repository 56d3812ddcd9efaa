/**
 * `verify` of a chunk store (docs/chunk-store.md, "Verify"): for each selected backup, its
 * manifest (checksum; with the key its signature), its indexes and blobs (against the sizes and
 * SHA-256 the manifest records; blobs decoded), then the chunks of all selected backups in one
 * native pass: each distinct chunk fetched once (a fossil counts as present), decoded and checked
 * against its digest, all of them or a random share of each backup's (`samplePercent`). A missing
 * or corrupt chunk is a problem of every selected backup whose indexes name it.
 *
 * Each verdict is recorded beside the backup's manifest (`verify.json`, {@link ChunkVerifyState}):
 * `ok` only after a full verify, `failed` whenever something was found (sampled or not); a
 * sampled verify that found nothing leaves the previous verdict. A backup whose last verify
 * failed is not the base of the next incremental or deduplicated backup (the chunk provider's
 * `trustedPrevious`, `previousArchive`), as Proxmox Backup Server skips a previous snapshot whose
 * `verify_state` is failed (proxmox-backup `src/api2/backup/mod.rs`): that next backup reads
 * everything and uploads what is lost.
 *
 * An encrypted store needs its key: without it a chunk's content cannot be checked (only its tag
 * proves it), and a verify that checked manifests alone would report sound backups it never
 * read. It fails with `ERR_KEY_REQUIRED` before anything is read.
 *
 * @packageDocumentation
 */
import type { LogFunction } from '../provider/api.js';
import { ChunkBackupError, ChunkStoreError } from './errors.js';
import { nativeVerifyChunks, type ChunkVerify } from './jobs.js';
import { digestOfKey, type ChunkStore, type ChunkVerifyState } from './store.js';

/** One backup's verdict: the shape both stores' `verify` prints. */
export interface ChunkVerifyResult {
  volid: string;
  ok: boolean;
  /** One line each, naming the object (and, for a chunk, every backup that needs it). */
  problems: string[];
  /** Its distinct chunks (zero chunks are not stored), and how many of them were checked. */
  chunks: { total: number; checked: number };
}

/** What to verify, and how. */
export interface VerifyChunkStoreOptions {
  /** The backups (volume names); none: every backup of the store, or of `vmid`. */
  volnames?: string[];
  vmid?: number;
  /** Share of each backup's distinct chunks to check, in (0, 100] (default 100: all), chosen at random per run. */
  samplePercent?: number;
  /** Bytes per second fetched at most. */
  bandwidthLimit?: number;
  onProgress?: (p: { checked: number; total: number; bytesRead: number; bytesPerSecond: number }) => void;
  signal?: AbortSignal;
  /** Warnings: a verdict the store refused to record (credentials that may only read). */
  log?: LogFunction;
}

/** Codes that are a finding about one backup's object; any other error (the store failed) ends the verify. */
const FINDINGS: ReadonlySet<string> = new Set(['ERR_BACKUP_CORRUPT', 'ERR_BACKUP_VERSION', 'ERR_KEY_MISMATCH', 'ERR_KEY_REQUIRED']);

function finding(err: unknown): string {
  if ((err instanceof ChunkBackupError || err instanceof ChunkStoreError) && FINDINGS.has(err.code)) return err.message;
  throw err;
}

/**
 * Records `state` as the backup's last verdict. Credentials that may only read (an auditor's) are
 * refused: the verdicts are what verify answers, and recording them only steers the next backups,
 * so that refusal is a warning. Any other store error ends the verify.
 */
async function recordVerdict(store: ChunkStore, volname: string, state: ChunkVerifyState, log: LogFunction | undefined): Promise<void> {
  try {
    await store.writeVerifyState(volname, state);
  } catch (err) {
    if (!(err instanceof ChunkStoreError) || err.code !== 'ERR_STORE_ACCESS') throw err;
    const next = state.state === 'failed' ? 'the next backup may still build on it' : 'nothing changes for the next backup';
    log?.('warn', `${store.volid(volname)}: the store refused to record the verdict (${err.message}): ${next}`);
  }
}

/**
 * Moves the chunks found damaged out of the way ({@link ChunkStore.setAsideDamagedChunk}), so
 * that the next backup that reads their content stores them again instead of taking them as
 * present: without that, no backup made after the damage could be restored. Each is checked a
 * second time first (a damaged read is moved only when it is damaged again). Credentials that
 * may only read cannot move them: a warning, as for the verdicts.
 */
async function setAsideDamaged(store: ChunkStore, corrupt: Array<{ key: string; code: string }>, job: ChunkVerify, log: LogFunction | undefined): Promise<void> {
  const digests = corrupt.filter((p) => p.code === 'ERR_BACKUP_CORRUPT').map((p) => Buffer.from(digestOfKey(p.key), 'hex'));
  if (digests.length === 0) return;
  const { onProgress: _p, samplePercent: _s, ...rest } = job;
  const again = await nativeVerifyChunks({ ...rest, sources: [{ name: 'again', digests }] });
  for (const p of again.corrupt.filter((c) => c.code === 'ERR_BACKUP_CORRUPT')) {
    const digest = Buffer.from(digestOfKey(p.key), 'hex');
    try {
      const moved = await store.setAsideDamagedChunk(digest);
      if (moved.length > 0) log?.('warn', `chunk ${store}/${p.key} is damaged: moved to ${store}/bad/ (${moved.join(', ')}), so that the next backup holding its content stores it again`);
    } catch (err) {
      if (!(err instanceof ChunkStoreError) || err.code !== 'ERR_STORE_ACCESS') throw err;
      log?.('warn', `chunk ${store}/${p.key} is damaged, and the store refused to move it aside (${err.message}): backups will keep taking it as stored until it is removed`);
    }
  }
}

/**
 * Verifies backups of a chunk store.
 * @throws {@link ChunkStoreError} `ERR_KEY_REQUIRED` (an encrypted store without its key), the
 *   store's errors; {@link ChunkBackupError} `ERR_UNKNOWN_VOLUME` for a named backup that does
 *   not exist; `CancelledError` on `signal`.
 */
export async function verifyChunkStore(store: ChunkStore, o: VerifyChunkStoreOptions = {}): Promise<ChunkVerifyResult[]> {
  await store.assertKey();
  const named = o.volnames !== undefined;
  const volnames = o.volnames ?? (await store.listBackups(o.vmid)).map((b) => b.volname);
  const backups: Array<{ volname: string; problems: string[]; digests: Buffer[] }> = [];
  for (const volname of volnames) {
    const problems: string[] = [];
    const digests: Buffer[] = [];
    let m;
    try {
      m = await store.readManifest(volname, { needKey: true });
    } catch (err) {
      if (err instanceof ChunkBackupError && err.code === 'ERR_UNKNOWN_VOLUME') {
        if (named) throw err;
        continue; // deleted since the listing (a prune elsewhere): not a backup any more
      }
      backups.push({ volname, problems: [finding(err)], digests });
      continue;
    }
    for (const device of Object.keys(m.devices ?? {})) {
      try {
        digests.push(...(await store.readFixedIndex(m, device)).digests);
      } catch (err) {
        problems.push(finding(err));
      }
    }
    if (m.archive) {
      try {
        digests.push(...(await store.readArchiveIndex(m)).digests);
      } catch (err) {
        problems.push(finding(err));
      }
    }
    for (const name of Object.keys(m.files).filter((f) => f.endsWith('.blob'))) {
      try {
        await store.getBlob(m, name);
      } catch (err) {
        problems.push(finding(err));
      }
    }
    backups.push({ volname, problems, digests });
  }

  const job: ChunkVerify = {
    store: store.options,
    ...(store.fingerprint ? { storeFingerprint: store.fingerprint } : {}),
    sources: backups.map((b) => ({ name: b.volname, digests: b.digests })),
    ...(o.samplePercent !== undefined ? { samplePercent: o.samplePercent } : {}),
    ...(o.bandwidthLimit !== undefined ? { bandwidthLimit: o.bandwidthLimit } : {}),
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
  };
  const s = await nativeVerifyChunks(job);
  const byName = new Map(backups.map((b) => [b.volname, b]));
  const missing = new Map<string, number>();
  for (const p of s.missing) for (const v of p.neededBy) missing.set(v, (missing.get(v) ?? 0) + 1);
  const neededBy = (names: string[]): string => names.map((v) => store.volid(v)).join(', ');
  for (const p of s.missing) {
    for (const v of p.neededBy) byName.get(v)?.problems.push(`chunk ${store}/${p.key} is missing; needed by ${neededBy(p.neededBy)}`);
  }
  for (const p of s.corrupt) {
    for (const v of p.neededBy) byName.get(v)?.problems.push(`chunk ${store}/${p.key} is corrupt: ${p.error}; needed by ${neededBy(p.neededBy)}`);
  }
  await setAsideDamaged(store, s.corrupt, job, o.log);
  const sampled = o.samplePercent !== undefined && o.samplePercent < 100;
  const time = Math.floor(Date.now() / 1000);
  for (const b of backups) {
    const lost = missing.get(b.volname) ?? 0;
    const state: ChunkVerifyState = { state: b.problems.length === 0 ? 'ok' : 'failed', time, missing: lost, bad: b.problems.length - lost };
    // a sample that found nothing proves little: it leaves the previous verdict
    if (state.state === 'failed' || !sampled) await recordVerdict(store, b.volname, state, o.log);
  }
  return backups.map((b, i) => ({
    volid: store.volid(b.volname),
    ok: b.problems.length === 0,
    problems: b.problems,
    chunks: { total: s.sources[i]?.chunks ?? 0, checked: s.sources[i]?.checked ?? 0 },
  }));
}
