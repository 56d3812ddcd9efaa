import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    setupFiles: ['test/helpers/state-dir.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Tests start real QEMU and NBD servers; two cores do not take much more in parallel.
    maxWorkers: 2,
    minWorkers: 1,
    reporters: ['default'],
  },
});
