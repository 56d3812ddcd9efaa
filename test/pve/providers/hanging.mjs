// A provider module for the bridge tests: the DirectoryProvider, except that job_init does not
// answer for 20 s (a hung provider), and backup_vm waits for its cancellation.
import { DirectoryProvider } from '../../../dist/index.js';

export default class HangingProvider extends DirectoryProvider {
  async jobInit() {
    await new Promise((resolve) => setTimeout(resolve, 20_000));
  }
}
