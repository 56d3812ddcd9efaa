// A provider module for the storage-plugin tests (test/pve-plugin.test.ts): only the storage side
// (ProviderStorage), over one JSON file named by the storage option `jsonstore-file`:
//   {backups: [{volname, vmid, vmtype, ctime, size, notes?, protected?}],
//    status: {total, free, used}, fail: {hook: message}, hang: [hook], slow: {hook: ms}, without: [hook],
//    ownPrune: 'marks' | 'removed', blockConstruct: true}
// With ownPrune it has its own prune, which keeps only the newest backup whatever the keep
// options say, answering its marks or only what it removed.
// Each construction appends a line to `<file>.spawns`, so a test counts the hosts started.
// Archive names are `guest=<vmid>/<time>`: the vmid follows `guest=` (pveStorage.archiveNameVmid).
import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';

export const pveStorage = {
  properties: {
    'jsonstore-file': { type: 'string', description: 'The JSON file holding the backups.' },
    'jsonstore-token': { type: 'string', description: 'A secret the provider needs.' },
    'jsonstore-level': { type: 'integer', description: 'A number.', minimum: 1, maximum: 9, default: 3 },
  },
  options: {
    'jsonstore-file': { fixed: true },
    'jsonstore-token': { optional: true },
    'jsonstore-level': { optional: true },
  },
  sensitive: ['jsonstore-token'],
  archiveNameVmid: '^guest=(\\d+)/',
};

const HOOKS = ['status', 'listBackups', 'getNotes', 'getProtected', 'setNotes', 'setProtected', 'removeBackup'];

export default class JsonStoreProvider {
  apiVersion = 2;

  constructor(context) {
    this.file = context.scfg['jsonstore-file'];
    this.token = context.scfg['jsonstore-token'];
    appendFileSync(`${this.file}.spawns`, `${process.pid}\n`);
    const data = this.read();
    // a constructor stuck for good (blocking the whole process, as a sync call to a dead NFS would)
    if (data.blockConstruct) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 60_000);
    const storage = {};
    for (const hook of HOOKS) {
      if ((data.without ?? []).includes(hook)) continue;
      storage[hook] = async (...args) => {
        const d = this.read();
        if ((d.hang ?? []).includes(hook)) {
          // a provider stuck on its network: a live handle keeps the process up
          await new Promise(() => setInterval(() => undefined, 1000));
        }
        // a provider taking its time (a delete that first merges a large image into another)
        if (d.slow?.[hook]) await new Promise((resolve) => setTimeout(resolve, d.slow[hook]));
        if (d.fail?.[hook]) {
          const err = new Error(d.fail[hook]);
          err.code = 'ERR_VENDOR_STORE';
          throw err;
        }
        return this[hook](d, ...args);
      };
    }
    if (data.ownPrune) {
      storage.prune = async ({ vmid, vmtype, dryRun }) => {
        const d = this.read();
        const mine = d.backups.filter((b) => b.vmid === vmid && b.vmtype === vmtype).sort((a, b) => b.ctime - a.ctime);
        const marks = mine.map((b, i) => ({ volname: b.volname, vmid, vmtype, ctime: b.ctime, mark: b.protected ? 'protected' : i === 0 ? 'keep' : 'remove' }));
        const removed = marks.filter((m) => m.mark === 'remove').map((m) => m.volname);
        if (!dryRun) {
          d.backups = d.backups.filter((b) => !removed.includes(b.volname));
          this.write(d);
        }
        return d.ownPrune === 'marks' ? { marks, removed } : { removed };
      };
    }
    this.storage = storage;
  }

  read() {
    return JSON.parse(readFileSync(this.file, 'utf8'));
  }

  write(d) {
    writeFileSync(this.file, JSON.stringify(d));
  }

  find(d, volname) {
    const b = d.backups.find((x) => x.volname === volname);
    if (!b) throw Object.assign(new Error(`no backup ${volname}`), { code: 'ERR_UNKNOWN_VOLUME' });
    return b;
  }

  providerName() {
    return this.token ? `jsonstore with token ${this.token}` : 'jsonstore';
  }

  status(d) {
    return d.status;
  }

  listBackups(d, { vmid }) {
    return d.backups.filter((b) => vmid === undefined || b.vmid === vmid);
  }

  getNotes(d, volname) {
    return this.find(d, volname).notes;
  }

  getProtected(d, volname) {
    return this.find(d, volname).protected === true;
  }

  setNotes(d, volname, notes) {
    this.find(d, volname).notes = notes;
    this.write(d);
  }

  setProtected(d, volname, value) {
    this.find(d, volname).protected = value;
    this.write(d);
  }

  removeBackup(d, volname) {
    if (this.find(d, volname).protected) throw Object.assign(new Error(`${volname} is protected`), { code: 'ERR_BACKUP_PROTECTED' });
    d.backups = d.backups.filter((b) => b.volname !== volname);
    this.write(d);
  }
}
