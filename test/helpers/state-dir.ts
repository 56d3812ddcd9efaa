/**
 * Each test file gets a host state folder of its own (the DirectoryProvider's bitmap ledger):
 * test files run in parallel and reuse VM ids and storage ids, which on one host would make their
 * stores look like they share QEMU's bitmaps. CLI children inherit it through the environment.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

process.env['PVE_BACKUP_PROVIDER_STATE_DIR'] = mkdtempSync(path.join(tmpdir(), 'pvebp-state-'));
