/**
 * The container part of a guest backup: what the provider's `backupContainer` gets.
 *
 * @packageDocumentation
 */
import { parseIdMap } from '../container/idmap.js';
import type { IdMapEntry } from '../provider/api.js';
import { settleOnAbort } from './abort.js';
import type { JobContext } from './context.js';
import type { TaskLog } from './task-log.js';
import type { ContainerGuest } from './types.js';

/** Host uid of the container's root user under `idMap` (0 without a map). */
export function backupUserId(idMap: IdMapEntry[]): number {
  const e = idMap.find((m) => m.type === 'u' && m.container <= 0 && 0 < m.container + m.length);
  return e ? e.host - e.container : 0;
}

/** Backs up one container: its id map, mount points and exclusions, handed to the provider's `backupContainer`. */
export async function backupContainerGuest(ctx: JobContext, guest: ContainerGuest, tlog: TaskLog, archiveName: string): Promise<void> {
  let idMap: IdMapEntry[] = [];
  if (guest.idMap && guest.idMap.length > 0) {
    idMap = typeof guest.idMap[0] === 'string' ? parseIdMap(guest.idMap as string[]) : (guest.idMap as IdMapEntry[]);
  }
  const sources = guest.sources ?? ['.'];
  const excludePaths = guest.excludePaths ?? [];
  for (const s of sources) tlog.info(`including mount point '${s}' in backup`);
  for (const e of excludePaths) tlog.info(`excluding '${e}'`);
  const info = {
    directory: guest.rootdir,
    sources,
    backupUserId: backupUserId(idMap),
    idMap,
    ...(ctx.opts.bandwidthLimit !== undefined ? { bandwidthLimit: ctx.opts.bandwidthLimit } : {}),
    ...(guest.firewallConfig !== undefined ? { firewallConfig: guest.firewallConfig } : {}),
    archiveName,
    signal: ctx.signal,
  };
  await settleOnAbort(ctx.driver.backupContainer(guest.vmid, { config: guest.config, excludePaths, info }), ctx.signal);
}
