/**
 * A TLS endpoint in front of a plain-HTTP S3 gateway (Garage speaks HTTP only): a Node `tls`
 * server on loopback that forwards each connection, once its handshake is done, to the gateway.
 * Its certificate is made by `openssl req`: self-signed under a name that is not the endpoint's,
 * or signed by a CA of the test's own for `IP:127.0.0.1`.
 */
import { X509Certificate } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { createServer } from 'node:tls';

import { execFileP } from './qemu.js';
import { requireTool } from './tools.js';

/** A running TLS endpoint. */
export interface TlsProxy {
  /** `https://127.0.0.1:port`. */
  endpoint: string;
  /** The certificate's SHA-256 fingerprint as Proxmox VE writes it (`AB:CD:…`). */
  fingerprint: string;
  /** The CA that signed the certificate (`ca` certificates only). */
  caFile?: string;
  /** TLS connections clients opened (handshakes begun, whatever their outcome). */
  connections: number;
  /** Connections forwarded to the gateway: only those whose handshake completed. */
  forwarded: number;
  /** Bytes forwarded to the gateway (requests that got through TLS). */
  bytesToGateway: number;
  close(): Promise<void>;
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

/** Makes `dir/key.pem` and `dir/cert.pem`; for `ca`, also `dir/ca.pem` that signed it. */
async function makeCertificate(dir: string, kind: 'self-signed' | 'ca'): Promise<void> {
  const openssl = requireTool('openssl', 'openssl');
  if (kind === 'self-signed') {
    // a name that is not 127.0.0.1: a pinned certificate is trusted whatever its names
    await execFileP(openssl, ['req', '-x509', ...EC, '-days', '1', '-subj', '/CN=not-the-endpoint.example', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')]);
    return;
  }
  await execFileP(openssl, ['req', '-x509', ...EC, '-days', '1', '-subj', '/CN=pbp test CA', '-keyout', join(dir, 'ca.key'), '-out', join(dir, 'ca.pem')]);
  await execFileP(openssl, ['req', ...EC, '-subj', '/CN=127.0.0.1', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'leaf.csr')]);
  writeFileSync(join(dir, 'leaf.ext'), 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n');
  await execFileP(openssl, [
    'x509', '-req', '-in', join(dir, 'leaf.csr'), '-CA', join(dir, 'ca.pem'), '-CAkey', join(dir, 'ca.key'), '-CAcreateserial',
    '-days', '1', '-extfile', join(dir, 'leaf.ext'), '-out', join(dir, 'cert.pem'),
  ]);
}

/**
 * Starts a TLS endpoint forwarding to `gateway` (`http://host:port`), its certificate and key
 * made in `dir`.
 */
export async function startTlsProxy(gateway: string, dir: string, kind: 'self-signed' | 'ca'): Promise<TlsProxy> {
  await makeCertificate(dir, kind);
  const cert = readFileSync(join(dir, 'cert.pem'));
  const target = new URL(gateway);
  const server = createServer({ key: readFileSync(join(dir, 'key.pem')), cert }, (tls) => {
    proxy.forwarded++;
    const plain = connect(Number(target.port), target.hostname);
    sockets.add(plain);
    plain.on('close', () => sockets.delete(plain));
    tls.on('data', (b: Buffer) => {
      proxy.bytesToGateway += b.length;
    });
    tls.pipe(plain).pipe(tls);
    tls.on('error', () => plain.destroy());
    plain.on('error', () => tls.destroy());
  });
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    proxy.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  // a client refusing the certificate aborts the handshake: expected here
  server.on('tlsClientError', () => {});
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const proxy: TlsProxy = {
    endpoint: `https://127.0.0.1:${(server.address() as AddressInfo).port}`,
    fingerprint: new X509Certificate(cert).fingerprint256,
    ...(kind === 'ca' ? { caFile: join(dir, 'ca.pem') } : {}),
    connections: 0,
    forwarded: 0,
    bytesToGateway: 0,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
  return proxy;
}
