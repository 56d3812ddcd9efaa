/**
 * Backup access on Proxmox QEMU through `backup-access-setup` / `backup-access-teardown`, in
 * both forms: the seed's (`target-id`, `devlist`, `bitmap-name`) and the later landed one
 * (`target-id`, `devices: [{ device, bitmap-mode }]`). The `<device>-fleecing` images are
 * attached as Proxmox's code expects; the NBD server and exports are set up here.
 *
 * @packageDocumentation
 */
import { randomBytes } from 'node:crypto';
import type { QmpClient } from '../qmp/client.js';
import { queryNamedBlockNodes } from '../qmp/commands.js';
import { QmpError } from '../qmp/errors.js';
import { withFrozenFilesystems } from '../qmp/guest-agent.js';
import { InvalidArgumentError } from '../errors.js';
import { addFleecingNodes, createFleecingImage } from './fleecing.js';
import { addExport, deleteExports, startNbdServer } from './nbd-exports.js';
import { StepRunner, removeLocalFiles } from './teardown-steps.js';
import { resolveDevices } from './devices.js';
import { BackupAccessActiveError, BackupAccessError, deviceError } from './errors.js';
import { anchorBitmapName, fleecingPath, slotNames, storageTargetId } from './names.js';
import { claimState, deleteState, newAccessState, readState, writeState, type AccessState, type DeviceState } from './state.js';
import type { BitmapAction } from './types.js';
import type { UpstreamSetupInput } from './upstream.js';

/** Result per device of {@link setupProxmox}. */
export interface ProxmoxDeviceResult {
  device: string;
  nodeName: string;
  size: number;
  exportName: string;
  bitmapName: string | undefined;
  /** Node the exported bitmap lives on, with `bitmapName`. */
  bitmapNode: string | undefined;
  action: BitmapAction;
}

/** One entry of `backup-access-setup`'s answer. */
interface BackupAccessInfo {
  'node-name': string;
  device: string;
  size: number;
  'bitmap-node-name'?: string;
  'bitmap-name'?: string;
  'bitmap-action'?: string;
}

/**
 * What QEMU told about itself, per connection: a QEMU process does not change its commands while
 * connected, so each job (and each guest reusing a connection) asks once.
 */
const probed = new WeakMap<QmpClient, { proxmox?: boolean; form?: 'devices' | 'devlist' }>();

function probes(qmp: QmpClient): { proxmox?: boolean; form?: 'devices' | 'devlist' } {
  let p = probed.get(qmp);
  if (!p) probed.set(qmp, (p = {}));
  return p;
}

/** True when QEMU offers Proxmox's backup access API (`query-proxmox-support`; asked once per connection). */
export async function detectProxmox(qmp: QmpClient): Promise<boolean> {
  const p = probes(qmp);
  if (p.proxmox !== undefined) return p.proxmox;
  try {
    const r = await qmp.execute<Record<string, unknown>>('query-proxmox-support');
    p.proxmox = r['backup-access-api'] === true;
  } catch (err) {
    if (!(err instanceof QmpError)) throw err;
    p.proxmox = false;
  }
  return p.proxmox;
}

/**
 * Which form of `backup-access-setup` QEMU has, from `query-qmp-schema` (default: the landed
 * one). Asked once per connection: the schema is QEMU's largest answer.
 */
async function detectForm(qmp: QmpClient): Promise<'devices' | 'devlist'> {
  const p = probes(qmp);
  p.form ??= await schemaForm(qmp);
  return p.form;
}

async function schemaForm(qmp: QmpClient): Promise<'devices' | 'devlist'> {
  try {
    const schema = await qmp.execute<Array<Record<string, unknown>>>('query-qmp-schema');
    const cmd = schema.find((e) => e['meta-type'] === 'command' && e.name === 'backup-access-setup');
    const argType = cmd?.['arg-type'];
    const obj = schema.find((e) => e.name === argType);
    const members = Array.isArray(obj?.members) ? (obj.members as Array<{ name?: string }>).map((m) => m.name) : [];
    if (members.includes('devlist')) return 'devlist';
  } catch (err) {
    if (!(err instanceof QmpError)) throw err;
  }
  return 'devices';
}

function mapAction(raw: string | undefined, anchorExisted: boolean): BitmapAction {
  switch (raw) {
    case undefined:
    case 'not-used':
      return 'not-used';
    case 'not-used-removed':
      return 'not-used-removed';
    case 'new':
      return 'new';
    case 'used':
      return 'used';
    case 'missing-recreated':
      return anchorExisted ? 'invalid' : 'new';
    default:
      return 'invalid';
  }
}

/** The device named in a QEMU error message, if one of ours is. */
function deviceIn(desc: string, devices: string[]): string | undefined {
  return [...devices].sort((a, b) => b.length - a.length).find((d) => desc.includes(d));
}

/** Sets up backup access with Proxmox's QMP command. On failure everything done is undone. */
export async function setupProxmox(qmp: QmpClient, input: UpstreamSetupInput): Promise<{ state: AccessState; devices: ProxmoxDeviceResult[] }> {
  const existing = input.known ? input.known.state : await readState(qmp);
  if (existing) throw new BackupAccessActiveError(existing.targetId);
  for (const d of input.devices) {
    if (`${d}-fleecing`.length > 31) throw new InvalidArgumentError(`device name ${d} is too long for a fleecing node name`);
  }
  const form = await detectForm(qmp);
  const nodes = input.known?.blockInfo?.nodes ?? (await queryNamedBlockNodes(qmp));
  // Proxmox's QEMU inserts its own filter: only the sizes (for the fleecing images) and the nodes
  // the bitmaps live on are needed from the lookup.
  const resolved = await resolveDevices(qmp, input.devices, { ...input.known?.blockInfo, nodes });
  const sizes = resolved.map((r) => r.size);
  const token = randomBytes(4).toString('hex');
  // qemu-server (VZDump/QemuServer.pm archive_external) passes target-id 'snapshot-access:<storeid>'
  // and QEMU names the bitmap after the target (pve-qemu patch 0044: bitmap_name = target_id).
  // The storage's own bitmap id gets exactly that, so a vzdump run and this package share it;
  // another bitmap id (the seed generation's chain ids) keeps a target of its own.
  const sharedWithVzdump = input.bitmap !== undefined && input.targetId === storageTargetId(input.bitmap);
  const qemuTargetId = form === 'devices' && input.bitmap !== undefined && !sharedWithVzdump ? `${input.targetId}/${input.bitmap}` : input.targetId;
  const devStates: DeviceState[] = input.devices.map((device, slot) => ({
    device,
    slot,
    source: device,
    fleecingPath: fleecingPath(input.fleecingDir, token, device, input.fleecingFormat),
    fleecingFormat: input.fleecingFormat,
    fleecingNode: `${device}-fleecing`,
    fleecingFileNode: slotNames(slot).fleecingFile,
    exportId: slotNames(slot).exportId,
    exportName: device,
  }));
  const state = newAccessState({ targetId: input.targetId, backend: 'proxmox', qemuTargetId, socket: input.socket, devices: devStates });

  await claimState(qmp, state);
  const results: ProxmoxDeviceResult[] = [];
  try {
    for (const [i, d] of devStates.entries()) await createFleecingImage(d.device, d.fleecingPath, d.fleecingFormat, sizes[i]!);
    for (const d of devStates) await addFleecingNodes(qmp, d.device, d);

    // One bitmap per target: bitmaps of this target under another bitmap id are obsolete.
    const removedStale = new Set<string>();
    const anchors = new Set<string>(); // `${node}\n${anchor name}`
    if (form === 'devices') {
      // the nodes as listed above: the fleecing nodes added since carry no bitmaps
      for (const n of nodes) {
        for (const b of n['dirty-bitmaps'] ?? []) {
          const ours = b.name === input.targetId || b.name.startsWith(`${input.targetId}/`);
          if (!ours) continue;
          const current = input.bitmap !== undefined && (b.name === qemuTargetId || b.name === anchorBitmapName(input.targetId, input.bitmap));
          if (current) {
            if (b.name !== qemuTargetId) anchors.add(`${n['node-name']}\n${b.name}`);
            continue;
          }
          if (b.name === qemuTargetId) continue;
          await qmp.execute('block-dirty-bitmap-remove', { node: n['node-name'], name: b.name }, { device: n['node-name'] });
          if (!b.name.includes('//')) removedStale.add(n['node-name']);
        }
      }
    }

    const args: Record<string, unknown> =
      form === 'devices'
        ? {
            'target-id': qemuTargetId,
            // per device, as qemu-server passes the provider's answer to backup_vm_query_incremental
            devices: input.devices.map((device) => ({ device, 'bitmap-mode': input.bitmap === undefined ? 'none' : (input.bitmapModes?.[device] ?? 'use') })),
          }
        : {
            'target-id': qemuTargetId,
            devlist: input.devices.join(','),
            ...(input.bitmap !== undefined ? { 'bitmap-name': input.bitmap } : {}),
          };
    let infos: BackupAccessInfo[];
    try {
      infos = await withFrozenFilesystems(input.qga, () =>
        qmp.execute<BackupAccessInfo[]>('backup-access-setup', args, { timeoutMs: 120_000 }),
      );
    } catch (err) {
      if (err instanceof QmpError) {
        const m = /previous backup for target '([^']*)' not finished/.exec(err.desc);
        if (m) throw new BackupAccessActiveError(m[1], err.desc);
        const dev = deviceIn(err.desc, input.devices);
        if (dev) throw deviceError(dev, 'backup-access-setup', err);
        throw new BackupAccessError(`backup-access-setup failed for ${input.devices.join(', ')}: ${err.desc}`, { cause: err });
      }
      throw err;
    }
    // The exports exist only once the setup has succeeded.
    if (input.socket.ownNbd) {
      await startNbdServer(qmp, input.socket.socketPath);
      state.ownNbd = true;
      await writeState(qmp, state);
    }
    for (const [i, d] of devStates.entries()) {
      const info = infos.find((x) => x.device === d.device) ?? infos[i];
      if (!info) throw new BackupAccessError(`${d.device}: backup-access-setup returned no entry for the device`, { device: d.device });
      const bitmapNode = info['bitmap-node-name'] ?? resolved[i]!.source;
      const bitmapName = info['bitmap-name'];
      await addExport(qmp, d.device, {
        exportId: d.exportId,
        exportName: d.exportName,
        node: info['node-name'],
        ...(bitmapName ? { bitmap: { node: bitmapNode, name: bitmapName } } : {}),
      });
      let anchorExisted = false;
      if (form === 'devices' && input.bitmap !== undefined && bitmapName) {
        const anchor = anchorBitmapName(input.targetId, input.bitmap);
        anchorExisted = anchors.has(`${bitmapNode}\n${anchor}`);
        if (!anchorExisted) {
          await qmp.execute(
            'block-dirty-bitmap-add',
            { node: bitmapNode, name: anchor, disabled: true, granularity: 2 ** 31 },
            { device: d.device },
          ).catch(() => undefined);
        }
      }
      let action = mapAction(info['bitmap-action'], anchorExisted);
      if (action === 'not-used' && removedStale.size > 0 && input.bitmap === undefined) action = 'not-used-removed';
      results.push({ device: d.device, nodeName: info['node-name'], size: info.size, exportName: d.exportName, bitmapName, bitmapNode: bitmapName ? bitmapNode : undefined, action });
    }
  } catch (err) {
    await teardownProxmox(qmp, state, false).catch(() => undefined);
    throw err;
  }
  return { state, devices: results };
}

/** Undoes a Proxmox access: exports, NBD server, `backup-access-teardown`, fleecing nodes and files. */
export async function teardownProxmox(qmp: QmpClient, state: AccessState, success: boolean): Promise<void> {
  const run = new StepRunner(qmp);
  await run.qmpStep('removing NBD exports', () => deleteExports(qmp, state.devices.map((d) => d.exportId)));
  if (state.ownNbd) {
    await run.qmpStep('stopping the NBD server', () => qmp.execute('nbd-server-stop').catch((err: unknown) => {
      if (!(err instanceof QmpError)) throw err;
    }));
  }
  await run.qmpStep('backup-access-teardown', async () => {
    try {
      await qmp.execute('backup-access-teardown', { 'target-id': state.qemuTargetId ?? state.targetId, success }, { timeoutMs: 120_000 });
    } catch (err) {
      throw new BackupAccessError(`backup-access-teardown for target '${state.targetId}' failed: ${(err as Error).message}`, { cause: err });
    }
  });
  // One look at the nodes for every device, not one per node. A fleecing file node goes with the
  // fleecing node that created it inline (blockdev-add): it is removed on its own only when it
  // was left without one.
  let present = new Set<string>();
  await run.qmpStep('listing the block nodes', async () => {
    present = new Set((await queryNamedBlockNodes(qmp)).map((n) => n['node-name']));
  });
  for (const d of [...state.devices].reverse()) {
    const names = present.has(d.fleecingNode) ? [d.fleecingNode] : [d.fleecingFileNode];
    for (const name of names) {
      await run.qmpStep(`${d.device}: removing node ${name}`, async () => {
        if (!present.has(name)) return;
        try {
          await qmp.execute('blockdev-del', { 'node-name': name }, { device: d.device });
        } catch (err) {
          throw deviceError(d.device, `removing node ${name}`, err);
        }
      });
    }
  }
  await removeLocalFiles(run, state);
  await run.qmpStep('removing the access record', () => deleteState(qmp));
  run.throwIfFailed(`teardown of backup access for target '${state.targetId}'`);
}
