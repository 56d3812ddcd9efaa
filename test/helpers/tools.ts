/**
 * Test helper: fail (never skip) when a tool is missing, saying how to install it.
 */
import { execFileSync } from 'node:child_process';

const found = new Map<string, string>();

/**
 * Returns the path of `name`, or throws `"<name> not found: apt-get install <debianPackage>"`.
 *
 * @param name - Executable name.
 * @param debianPackage - Debian package providing it.
 */
export function requireTool(name: string, debianPackage: string): string {
  const hit = found.get(name);
  if (hit) return hit;
  let p = '';
  try {
    p = execFileSync('sh', ['-c', 'command -v "$1"', 'sh', name], { encoding: 'utf8' }).trim();
  } catch {
    p = '';
  }
  if (!p) throw new Error(`${name} not found: apt-get install ${debianPackage}`);
  found.set(name, p);
  return p;
}
