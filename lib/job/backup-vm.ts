/**
 * The VM part of a guest backup: QEMU backup access around the provider's `backupVm`. The QEMU
 * work (target, device lookup, bitmaps, access) is lib/qemu's; this drives it and logs as vzdump.
 *
 * @packageDocumentation
 */
import { NbdClient } from '../nbd/client.js';
import { markSnapshotExport } from '../nbd/snapshot-exports.js';
import { explainFleecingFailure, recoverDeadAccess, setupBackupAccess, teardownBackupAccess } from '../qemu/backup-access.js';
import { bitmapsDirtyBytes, dropDeviceBitmap, resolveDevicesWithInfo } from '../qemu/devices.js';
import { storageTargetId } from '../qemu/names.js';
import { openQemuTarget } from '../qemu/qemu-target.js';
import type { BackupAccessDevice } from '../qemu/types.js';
import { GuestAgentClient } from '../qmp/guest-agent.js';
import type { DriverVolume } from '../provider/adapter.js';
import { dirtyRegions } from '../provider/dirty-regions.js';
import { formatBytes } from '../format.js';
import { raceAbort, settleOnAbort, toError } from './abort.js';
import type { JobContext } from './context.js';
import type { StepTimer } from './steps.js';
import type { TaskLog } from './task-log.js';
import type { VmGuest } from './types.js';

function bitmapStatus(d: BackupAccessDevice, forced: 'new' | 'none' | undefined, dirty: number | undefined): string | undefined {
  const prefix = `${d.device}: dirty-bitmap status:`;
  if (forced === 'none') return undefined;
  switch (d.bitmapAction) {
    case 'not-used':
      return undefined;
    case 'not-used-removed':
      return `${prefix} not used, existing bitmap removed`;
    case 'new':
      return `${prefix} created new`;
    case 'invalid':
      return forced === 'new' ? `${prefix} created new (requested by the provider)` : `${prefix} existing bitmap was invalid and has been cleared`;
    case 'used':
      return dirty === undefined ? `${prefix} OK` : `${prefix} OK (${formatBytes(dirty)} of ${formatBytes(d.size)} dirty)`;
    default:
      return undefined;
  }
}

/**
 * Backs up one VM: opens its QEMU (starting qemu-storage-daemon for a stopped VM), resolves the
 * devices, applies the provider's bitmap plan, sets up backup access (freezing file systems when
 * a guest agent is given), hands the volumes to the provider, and tears the access down telling
 * QEMU whether the backup succeeded.
 */
export async function backupVmGuest(
  ctx: JobContext,
  guest: VmGuest,
  tlog: TaskLog,
  gdir: string,
  mechanism: 'nbd' | 'file-handle',
  providerBitmapId: string | undefined,
  archiveName: string,
  timer: StepTimer,
): Promise<void> {
  const { opts, driver } = ctx;
  const target = await timer.time('qmp-connect', () => openQemuTarget(guest, gdir));
  let qga: GuestAgentClient | undefined;
  try {
    if (target.started) tlog.info(`VM ${guest.vmid} is not running: serving its disks with qemu-storage-daemon for the backup`);
    // A killed run's access first: its filter hides the disks' nodes (and their bitmaps) from the
    // lookup below, so a bitmap dropped for the provider would come back with its recovery.
    const { stale, recovered } = await timer.time('setup', () => recoverDeadAccess(target.qmp));
    for (const r of recovered) tlog.warn(`removed a stale backup access: ${r}`);
    // One lookup of QEMU's devices and nodes for the job: the sizes the provider is told, the
    // bitmaps dropped below, and backup access setup (handed on as blockInfo) all read it.
    const { devices: sources, info: blockInfo } = await timer.time('setup', () => resolveDevicesWithInfo(target.qmp, target.devices));
    const sizes: Record<string, number> = {};
    for (const s of sources) {
      sizes[s.device] = s.size;
      tlog.info(`include disk '${s.device}' ${formatBytes(s.size)}`);
    }
    const targetId = storageTargetId(opts.storeid);
    const forced: Record<string, 'new' | 'none' | undefined> = {};
    const plan = await timer.time('bitmap-query', async () => {
      const p = await raceAbort(driver.vmBitmapPlan(guest.vmid, providerBitmapId, sizes, opts.storeid), ctx.signal);
      if (p.bitmapId) {
        for (const s of sources) {
          const want = p.devices[s.device];
          if (want === 'use') continue;
          forced[s.device] = want === 'new' ? 'new' : 'none';
          await dropDeviceBitmap(target.qmp, s, targetId, p.bitmapId); // keeps blockInfo true
        }
      }
      return p;
    });
    const access = await timer.time('setup', async () => {
      if (guest.qga) {
        try {
          qga = await GuestAgentClient.connect(guest.qga, { timeoutMs: 5000 });
          tlog.info("issuing guest-agent 'fs-freeze' command");
        } catch (err) {
          tlog.warn(`skipping guest-agent 'fs-freeze', agent configured but not running? (${toError(err).message})`);
        }
      }
      ctx.signal.throwIfAborted();
      return setupBackupAccess(target.qmp, {
        targetId,
        devices: target.devices,
        ...(plan.bitmapId ? { bitmap: plan.bitmapId, bitmapModes: plan.devices } : {}),
        fleecing: { dir: opts.fleecing?.dir ?? gdir, format: opts.fleecing?.format ?? 'qcow2' },
        ...(qga ? { qga } : {}),
        ...(target.nbdServer ? { nbdServer: target.nbdServer } : {}),
        ...(opts.backend ? { backend: opts.backend } : {}),
        blockInfo,
        accessRecord: { state: recovered.length > 0 ? undefined : stale },
      });
    });
    if (qga) tlog.info("issuing guest-agent 'fs-thaw' command");
    for (const r of access.recovered ?? []) tlog.warn(`removed a stale backup access: ${r}`);
    tlog.info(`started backup access (${access.backend} QEMU), NBD socket ${access.socketPath}`);
    let success = false;
    const clients: NbdClient[] = [];
    const iterators: Array<AsyncGenerator<[number, number]>> = [];
    // while the provider reads them, these exports are known fleecing snapshots (helpers discard there)
    const unmark = access.devices.map((d) => markSnapshotExport(d.nbdUri));
    try {
      // QEMU's count of the frozen bitmaps' dirty bytes, for the log: one query for every device.
      const used = access.devices.filter((d) => d.bitmapAction === 'used' && d.bitmapName && d.bitmapNode);
      const counts = await timer.time('bitmap-query', () =>
        bitmapsDirtyBytes(target.qmp, used.map((d) => ({ node: d.bitmapNode!, name: d.bitmapName! }))).catch(() => [] as Array<number | undefined>),
      );
      const dirtyOf = new Map(used.map((d, i) => [d.device, counts[i]]));
      const volumes: DriverVolume[] = [];
      for (const d of access.devices) {
        const f = forced[d.device];
        const status = bitmapStatus(d, f, dirtyOf.get(d.device));
        if (status) tlog.info(status);
        const noBitmap = f === 'none';
        const v: DriverVolume = {
          device: d.device,
          size: d.size,
          bitmapMode: noBitmap ? 'none' : d.bitmapMode,
          bitmapAction: noBitmap ? 'not-used' : d.bitmapAction,
          bitmapName: noBitmap ? undefined : d.bitmapName,
          nbdPath: access.socketPath,
          nbdUri: d.nbdUri,
        };
        if (mechanism === 'file-handle') {
          const nbd = await NbdClient.connect(d.nbdUri, { metaContexts: [] });
          clients.push(nbd);
          v.fileHandle = { size: nbd.size, read: (o, l) => nbd.read(o, l), discard: (o, l) => nbd.trim(o, l) };
          const it = dirtyRegions(d.nbdUri, v.bitmapName);
          iterators.push(it);
          v.nextDirtyRegion = async () => {
            const n = await it.next();
            return n.done ? undefined : n.value;
          };
        }
        volumes.push(v);
      }
      try {
        await timer.time('provider', () => settleOnAbort(
          driver.backupVm(guest.vmid, {
            config: guest.config,
            firewallConfig: guest.firewallConfig,
            mechanism,
            volumes,
            bandwidthLimit: opts.bandwidthLimit,
            archiveName,
            signal: ctx.signal,
          }),
          ctx.signal,
        ));
      } catch (err) {
        // A full fleecing image shows only as refused reads: say so (before teardown removes the image).
        throw (await explainFleecingFailure(target.qmp, targetId, err)) ?? err;
      }
      success = true;
    } finally {
      for (const u of unmark) u();
      // close what the provider did not finish (file-handle): region iterators and connections
      for (const it of iterators) await it.return(undefined).catch(() => undefined);
      for (const c of clients) await c.close().catch(() => undefined);
      try {
        await timer.time('teardown', () => teardownBackupAccess(target.qmp, { targetId, success }));
        tlog.info(`backup access torn down (${success ? 'success' : 'failure'})`);
      } catch (err) {
        if (success) throw err;
        tlog.err(`tearing down backup access failed: ${toError(err).message}`);
      }
    }
  } finally {
    await timer.time('teardown', async () => {
      await qga?.close().catch(() => undefined);
      await target.close();
    });
  }
}
