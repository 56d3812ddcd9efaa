// A provider module for the bridge tests: the DirectoryProvider, plus a timer that keeps Node's
// event loop alive for good, as a vendor's token refresh or connection keep-alive does.
import { DirectoryProvider } from '../../../dist/index.js';

export default class TimerProvider extends DirectoryProvider {
  constructor(context) {
    super(context);
    setInterval(() => undefined, 60_000);
  }
}
