/**
 * JSON message framing for QMP and the QEMU guest agent, without I/O.
 *
 * QEMU writes one JSON object per line (`\r\n` terminated). The guest agent may emit a `0xFF`
 * sentinel byte before a response to `guest-sync-delimited`; it is skipped.
 *
 * @packageDocumentation
 */
import { StringDecoder } from 'node:string_decoder';

/** A decoded message: a parsed JSON object, or the raw line when it was not valid JSON. */
export type DecodedMessage = { ok: true; value: Record<string, unknown> } | { ok: false; line: string; error: unknown };

/** Longest line accepted before the peer is considered broken (16 MiB). */
export const MAX_LINE_BYTES = 16 * 1024 * 1024;

/**
 * Incremental decoder: feed chunks with {@link JsonLineDecoder.push}, get complete messages back.
 */
export class JsonLineDecoder {
  private readonly text = new StringDecoder('utf8');
  private buffer = '';

  /**
   * Adds bytes and returns every message completed by them, in order.
   *
   * @param chunk - Bytes read from the socket.
   * @throws RangeError when a single line exceeds {@link MAX_LINE_BYTES}.
   */
  push(chunk: Buffer): DecodedMessage[] {
    this.buffer += this.text.write(chunk);
    const out: DecodedMessage[] = [];
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      const msg = decodeLine(line);
      if (msg) out.push(msg);
    }
    if (this.buffer.length > MAX_LINE_BYTES) throw new RangeError('QMP message too long');
    return out;
  }

  /** Text received after the last newline (a message still incomplete). */
  get pending(): string {
    return this.buffer;
  }
}

/**
 * Decodes one line; `undefined` for an empty line.
 *
 * @param raw - One line without its `\n`.
 */
export function decodeLine(raw: string): DecodedMessage | undefined {
  // eslint-disable-next-line no-control-regex
  const line = raw.replace(/^[\uFFFD\u00FF\s]+/, '').trim();
  if (line === '') return undefined;
  try {
    const value: unknown = JSON.parse(line);
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      return { ok: false, line, error: new TypeError('not a JSON object') };
    }
    return { ok: true, value: value as Record<string, unknown> };
  } catch (error) {
    return { ok: false, line, error };
  }
}

/**
 * Encodes a message as one line.
 *
 * @param message - The JSON object to send.
 */
export function encodeMessage(message: Record<string, unknown>): string {
  return `${JSON.stringify(message)}\n`;
}
