// A provider module for the bridge tests: the DirectoryProvider, except that backup_container
// first stays silent for 2.5 s, longer than the bridge's one-second watch of the host, as a
// large container's copy does. With QUIET_CONTAINER_FAIL=1 in the host's environment it then
// fails instead of copying.
import { DirectoryProvider } from '../../../dist/index.js';

export default class QuietContainerProvider extends DirectoryProvider {
  async backupContainer(...args) {
    await new Promise((resolve) => setTimeout(resolve, 2500));
    if (process.env.QUIET_CONTAINER_FAIL === '1') {
      const err = new Error('backup_container failed late');
      err.code = 'ERR_VENDOR_LATE';
      throw err;
    }
    return super.backupContainer(...args);
  }
}
