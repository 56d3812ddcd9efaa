/**
 * How a store's own listing and retention decisions become the answers of
 * {@link ProviderStorage} (Proxmox's storage-side calls), for both reference stores.
 *
 * @packageDocumentation
 */
import type { GuestType, ProviderStorage, StoragePruneMark, StoredBackup } from './api.js';

/** A backup as a store lists it (Proxmox's `list_volumes` fields). */
export interface ListedBackupFields {
  volname: string;
  vmid: number;
  /** Guest type (Proxmox: `subtype`). */
  subtype: GuestType;
  ctime: number;
  size: number;
  protected: boolean;
  notes?: string;
}

/** A listed backup as `ProviderStorage.listBackups` answers it. */
export function storedBackup(b: ListedBackupFields): StoredBackup {
  return { volname: b.volname, vmid: b.vmid, vmtype: b.subtype, ctime: b.ctime, size: b.size, protected: b.protected, ...(b.notes !== undefined ? { notes: b.notes } : {}) };
}

/** A store's prune decisions as `ProviderStorage.prune` answers them: the marks, and what was removed unless it was a dry run. */
export function pruneAnswer(entries: ReadonlyArray<Omit<StoragePruneMark, 'vmtype'> & { subtype: GuestType }>, dryRun: boolean | undefined): Awaited<ReturnType<NonNullable<ProviderStorage['prune']>>> {
  const marks = entries.map((e) => ({ volname: e.volname, vmid: e.vmid, vmtype: e.subtype, ctime: e.ctime, mark: e.mark }));
  return { ...(dryRun ? {} : { removed: marks.filter((m) => m.mark === 'remove').map((m) => m.volname) }), marks };
}
