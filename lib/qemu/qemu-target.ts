/**
 * The QEMU process a VM backup reads from: a running QEMU (connected over QMP) or, for a stopped
 * VM, qemu-storage-daemon started on its disk images. Device lookup is `devices.ts`'s.
 *
 * @packageDocumentation
 */
import { QmpClient } from '../qmp/client.js';
import { InvalidArgumentError } from '../errors.js';
import { writableDevices } from './devices.js';
import { startStorageDaemon } from './storage-daemon.js';

/** A stopped VM's disk image, served by qemu-storage-daemon for the backup. */
export interface StoppedVmDisk {
  /** Device name (the raw node's name in qemu-storage-daemon). */
  device: string;
  /** Image file. */
  file: string;
  /** Image format. */
  format: 'raw' | 'qcow2';
}

/** Where a VM's disks are: the fields of the runner's `VmGuest` that {@link openQemuTarget} reads. */
export interface QemuTargetSpec {
  vmid: number;
  /** A QMP socket path, a connected client (left open), or a stopped VM's disks. */
  qmp: string | QmpClient | { disks: StoppedVmDisk[] };
  /** Devices to back up; default: every writable inserted drive, or every disk of a stopped VM. */
  devices?: string[];
  /** Unix socket of an NBD server the process already runs. */
  nbdServer?: string;
}

/** A QEMU process to back up from. */
export interface QemuTarget {
  qmp: QmpClient;
  /** NBD server the process already runs (qemu-storage-daemon), for backup access. */
  nbdServer: { path: string } | undefined;
  /** Devices to back up. */
  devices: string[];
  /** Whether the process was started for the backup (a stopped VM). */
  started: boolean;
  /** Disconnects, and stops the process when it was started for the backup. */
  close(): Promise<void>;
}

/**
 * Connects to (or, for a stopped VM, starts qemu-storage-daemon in `dir` on) the QEMU holding
 * the guest's disks.
 *
 * @throws {@link InvalidArgumentError} when there is nothing to back up or `qmp` is of no known form.
 */
export async function openQemuTarget(guest: QemuTargetSpec, dir: string): Promise<QemuTarget> {
  if (typeof guest.qmp === 'string' || guest.qmp instanceof QmpClient) {
    const own = typeof guest.qmp === 'string';
    const qmp = typeof guest.qmp === 'string' ? await QmpClient.connect(guest.qmp) : guest.qmp;
    const close = async (): Promise<void> => {
      if (own) await qmp.close().catch(() => undefined);
    };
    try {
      const devices = guest.devices ?? (await writableDevices(qmp));
      if (devices.length === 0) throw new InvalidArgumentError(`VM ${guest.vmid}: no devices to back up (pass devices)`);
      return { qmp, nbdServer: guest.nbdServer ? { path: guest.nbdServer } : undefined, devices, started: false, close };
    } catch (err) {
      await close();
      throw err;
    }
  }
  const disks = (guest.qmp as { disks?: StoppedVmDisk[] } | undefined)?.disks;
  if (!Array.isArray(disks) || disks.length === 0) throw new InvalidArgumentError(`VM ${guest.vmid}: qmp must be a socket path or { disks: [...] }`);
  const qsd = await startStorageDaemon({ dir, disks: disks.map((d) => ({ id: d.device, file: d.file, format: d.format })) });
  const devices = guest.devices ?? disks.map((d) => d.device);
  return { qmp: qsd.qmp, nbdServer: { path: qsd.nbdSocket }, devices, started: true, close: () => qsd.stop() };
}
