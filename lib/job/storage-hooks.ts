/**
 * The storage hooks vzdump runs after a successful guest backup: notes, protected flag, prune.
 *
 * @packageDocumentation
 */
import os from 'node:os';

import { NotImplementedError, StorageHookError } from '../provider/errors.js';
import { toError } from './abort.js';
import type { JobContext } from './context.js';
import type { TaskLog } from './task-log.js';
import type { Guest } from './types.js';

/** The vzdump notes template: `{{guestname}}`, `{{vmid}}`, `{{node}}`, `{{cluster}}`, `\n`, `\\`. */
export function expandNotesTemplate(template: string, vars: { guestname: string; vmid: number; node: string; cluster: string }): string {
  return template
    .replace(/\\(\\|n)/g, (_m, c: string) => (c === 'n' ? '\n' : '\\'))
    .replace(/\{\{(guestname|vmid|node|cluster)\}\}/g, (_m, k: keyof typeof vars) => String(vars[k]));
}

function guestName(guest: Guest): string {
  const key = guest.type === 'qemu' ? 'name' : 'hostname';
  const m = new RegExp(`^${key}:\\s*(\\S+)\\s*$`, 'm').exec(guest.config);
  return m?.[1] ?? `${guest.type === 'qemu' ? 'VM' : 'CT'} ${guest.vmid}`;
}

/**
 * After a successful guest backup, as vzdump does (pve-manager `VZDump.pm` `exec_backup_task`,
 * before `backup_cleanup(..., 1, {})`): notes from the template, the protected flag, then pruning.
 * Notes that cannot be set give a warning (upstream wraps them in `eval`); the protected flag and
 * pruning fail the guest when they fail (upstream lets them die), and so does a provider without
 * `setProtected` (the base `update_volume_attribute` dies). A provider without `prune` gives a
 * warning: upstream's base `prune_backups` never removes archives it does not recognise.
 *
 * @throws {@link StorageHookError} (`ERR_STORAGE_HOOK`, `cause` the provider's error) when
 *   `setProtected` or `prune` failed; {@link NotImplementedError} when protected is asked of a
 *   provider without `setProtected`.
 */
export async function applyStorageHooks(ctx: JobContext, guest: Guest, tlog: TaskLog, volname: string): Promise<void> {
  const { opts } = ctx;
  const storage = ctx.driver.storage;
  if (opts.notesTemplate !== undefined && opts.notesTemplate !== '') {
    const notes = expandNotesTemplate(opts.notesTemplate, { guestname: guestName(guest), vmid: guest.vmid, node: opts.node ?? os.hostname(), cluster: opts.cluster ?? '' });
    if (typeof storage?.setNotes !== 'function') tlog.warn(`backup provider '${ctx.providerName}' cannot set notes: skipped`);
    else {
      try {
        await storage.setNotes(volname, notes);
        tlog.info('adding notes to backup');
      } catch (err) {
        tlog.warn(`unable to add notes to backup - ${toError(err).message}`);
      }
    }
  }
  if (opts.protected) {
    if (typeof storage?.setProtected !== 'function') throw new NotImplementedError('storage.setProtected', ctx.providerName);
    try {
      await storage.setProtected(volname, true);
    } catch (err) {
      throw new StorageHookError(`unable to set protected flag - ${toError(err).message}`, { hook: 'protected', cause: err });
    }
    tlog.info('marked backup as protected');
  }
  if (opts.prune && Object.keys(opts.prune).length > 0) {
    if (typeof storage?.prune !== 'function') {
      tlog.warn(`backup provider '${ctx.providerName}' cannot prune older backups: skipped`);
      return;
    }
    tlog.info(`prune older backups with retention: ${Object.entries(opts.prune).map(([k, v]) => `${k}=${String(v)}`).join(', ')}`);
    let r: Awaited<ReturnType<typeof storage.prune>>;
    try {
      r = await storage.prune({ vmid: guest.vmid, vmtype: guest.type, keep: opts.prune });
    } catch (err) {
      throw new StorageHookError(`unable to prune older backups - ${toError(err).message}`, { hook: 'prune', cause: err });
    }
    const removed = r && Array.isArray(r.removed) ? r.removed : [];
    for (const v of removed) tlog.info(`removing backup '${v}'`);
    tlog.info(`pruned ${removed.length} backup(s)`);
  }
}
