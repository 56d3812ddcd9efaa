// A provider module for the bridge tests: the DirectoryProvider, except that backup_init logs
// a line and then fails with a vendor's error code. Default export: a factory.
import { DirectoryProvider } from '../../../dist/index.js';

class FailingProvider extends DirectoryProvider {
  async backupInit(vmid) {
    this.context.log('warn', `refusing VM ${vmid}`);
    const err = new Error(`the vendor's quota for VM ${vmid} is exhausted`);
    err.code = 'ERR_VENDOR_QUOTA';
    throw err;
  }
}

export default (context) => new FailingProvider(context);
