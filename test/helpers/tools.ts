/** Tests fail (never skip) when a tool is missing, saying how to install it: the library's own check. */
export { requireTool } from '../../lib/tools.js';
