/**
 * Work on many items, a few at once: requests to an object store, files of a backup store. Each
 * caller picks its own bound (what the store answers well at once); the order of results is the
 * order of the items, whatever order the work finishes in.
 *
 * @packageDocumentation
 */

/**
 * Runs `fn` on every item, at most `limit` at once (requests to the store, mostly waiting). The
 * first failure stops it: no item is started after it, and it is what rejects.
 */
export async function eachLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length && !failed) {
        try {
          await fn(items[next++]!);
        } catch (err) {
          failed = true;
          throw err;
        }
      }
    }),
  );
}

/**
 * `fn` of every item, at most `limit` at once, as {@link eachLimit} runs it; the results in the
 * order of `items`.
 */
export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  await eachLimit(
    items.map((item, i) => [item, i] as const),
    limit,
    async ([item, i]) => {
      out[i] = await fn(item);
    },
  );
  return out;
}
