/** Tests fail (never skip) when a tool is missing, saying how to install it: the library's own check. */
export { requireTool } from '../../lib/tools.js';

/** Whether no process with `pid` exists any more. */
export function gone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}
