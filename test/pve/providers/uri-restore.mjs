// A provider module for the bridge tests: the DirectoryProvider, except that restore_vm_volume_init
// answers a `json:` filename instead of a local file, which qemu-server's file_size_info check
// (QemuServer.pm restore_external_archive) cannot stat. Default export: a factory.
import { DirectoryProvider } from '../../../dist/index.js';

class UriRestoreProvider extends DirectoryProvider {
  async restoreVmVolumeInit() {
    return { qemuImgPath: 'json:{"file":{"driver":"nbd","path":"/run/x.sock"}}' };
  }
}

export default (context) => new UriRestoreProvider(context);
