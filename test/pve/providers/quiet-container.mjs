// A provider module for the bridge tests: the DirectoryProvider, except that backup_container
// first stays silent for 2.5 s, longer than the bridge's one-second watch of the host, as a
// large container's copy does.
import { DirectoryProvider } from '../../../dist/index.js';

export default class QuietContainerProvider extends DirectoryProvider {
  async backupContainer(...args) {
    await new Promise((resolve) => setTimeout(resolve, 2500));
    return super.backupContainer(...args);
  }
}
