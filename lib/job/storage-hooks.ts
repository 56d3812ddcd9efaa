/**
 * The storage hooks vzdump runs after a successful guest backup: notes, protected flag, prune.
 *
 * @packageDocumentation
 */
import os from 'node:os';

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
 * After a successful guest backup, as vzdump does: notes (from the template), the protected flag,
 * then pruning. A provider without the hook, or a hook that fails, gives a warning, not a failure.
 */
export async function applyStorageHooks(ctx: JobContext, guest: Guest, tlog: TaskLog, volname: string): Promise<void> {
  const { opts } = ctx;
  const storage = ctx.driver.storage;
  const hook = async (what: string, present: boolean, fn: () => Promise<void>): Promise<void> => {
    if (!present) {
      tlog.warn(`backup provider '${ctx.providerName}' cannot ${what}: skipped`);
      return;
    }
    try {
      await fn();
    } catch (err) {
      tlog.warn(`unable to ${what}: ${toError(err).message}`);
    }
  };
  if (opts.notesTemplate !== undefined && opts.notesTemplate !== '') {
    const notes = expandNotesTemplate(opts.notesTemplate, { guestname: guestName(guest), vmid: guest.vmid, node: opts.node ?? os.hostname(), cluster: opts.cluster ?? '' });
    await hook('set notes', typeof storage?.setNotes === 'function', async () => {
      await storage!.setNotes!(volname, notes);
      tlog.info('adding notes to backup');
    });
  }
  if (opts.protected) {
    await hook('set the protected flag', typeof storage?.setProtected === 'function', async () => {
      await storage!.setProtected!(volname, true);
      tlog.info('marked backup as protected');
    });
  }
  if (opts.prune && Object.keys(opts.prune).length > 0) {
    await hook('prune older backups', typeof storage?.prune === 'function', async () => {
      tlog.info(`prune older backups with retention: ${Object.entries(opts.prune!).map(([k, v]) => `${k}=${String(v)}`).join(', ')}`);
      const r = await storage!.prune!({ vmid: guest.vmid, vmtype: guest.type, keep: opts.prune! });
      const removed = r && Array.isArray(r.removed) ? r.removed : [];
      for (const v of removed) tlog.info(`removing backup '${v}'`);
      tlog.info(`pruned ${removed.length} backup(s)`);
    });
  }
}
