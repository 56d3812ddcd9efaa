/**
 * The NBD exports known to be fleecing snapshots of a running backup: the ones the job runner
 * hands a provider after backup access set them up. TRIM on such an export only frees fleecing
 * space; on any other export it destroys data. So helpers that discard by default do so only on
 * an export listed here; everything else discards only when the caller asks.
 *
 * @packageDocumentation
 */

/** `<socket path>\0<export name>` of an `nbd+unix` URI, so that differently spelled URIs match. */
function keyOf(uri: string): string | undefined {
  try {
    const u = new URL(uri);
    if (u.protocol !== 'nbd+unix:') return undefined;
    return `${u.searchParams.get('socket') ?? ''}\0${decodeURIComponent(u.pathname.replace(/^\//, ''))}`;
  } catch {
    return undefined;
  }
}

const snapshots = new Map<string, number>();

/**
 * Marks `uri` as a backup-access snapshot export while a backup reads it.
 * @returns The function that unmarks it (when the backup access is torn down).
 */
export function markSnapshotExport(uri: string): () => void {
  const key = keyOf(uri);
  if (key === undefined) return () => {};
  snapshots.set(key, (snapshots.get(key) ?? 0) + 1);
  let done = false;
  return () => {
    if (done) return;
    done = true;
    const n = (snapshots.get(key) ?? 1) - 1;
    if (n > 0) snapshots.set(key, n);
    else snapshots.delete(key);
  };
}

/** Whether `uri` is a snapshot export a running backup reads (see {@link markSnapshotExport}). */
export function isSnapshotExport(uri: string): boolean {
  const key = keyOf(uri);
  return key !== undefined && snapshots.has(key);
}
