// A consumer in Node.js that follows README "The lease contract" word for word, with the npm
// `redis` client and nothing of upbit-broker but its shipped script (broker/lease.lua):
//
//   node tests/node/lease.mjs REDIS_URL [NAMESPACE] [CLIENT_ID] [STREAM] [CODE]
//
// 1. SUBSCRIBE to the stream's channel (and the events) first,
// 2. EVAL broker/lease.lua with the README's two keys and five arguments, every TTL/3,
// 3. print the first frame (one line on stdout), release the lease, exit 0.
// Exit 1 when no frame arrives within 20 s. tests/test_lease_contract.py runs it.
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { createClient } from 'redis';

const [url = 'redis://127.0.0.1:6379/0', ns = 'upbit', id = 'node-bot', stream = 'ticker',
  code = 'KRW-BTC'] = process.argv.slice(2);
const broker = new URL('../../broker/', import.meta.url);
const leaseLua = readFileSync(new URL('lease.lua', broker), 'utf8');
const releaseLua = readFileSync(new URL('lease_release.lua', broker), 'utf8');
const ttlMs = 30000;
const keys = [`${ns}:lease:${id}`, `${ns}:leases`];
const subs = JSON.stringify({ [stream]: [code] });

const client = createClient({ url });
const subscriber = client.duplicate();
for (const c of [client, subscriber]) c.on('error', (err) => console.error('redis:', err.message));
await client.connect();
await subscriber.connect();

let received;
const firstFrame = new Promise((resolve) => { received = resolve; });
// 1. SUBSCRIBE before writing the lease, so the first frame (Upbit's SNAPSHOT) is not missed
await subscriber.subscribe(`${ns}:${stream}:${code}`, (message) => received(message));
await subscriber.subscribe(`${ns}:events`, (message) => {
  const event = JSON.parse(message);
  if (event.event === 'lease' && event.client_id === id) {
    console.error(`lease ${event.state}: ${event.why}`);
  }
});

// 2. the lease, and its heartbeat every TTL/3
const writeLease = () => client.eval(leaseLua, {
  keys, arguments: [id, String(ttlMs), subs, hostname(), String(process.pid)],
});
const [renewedMs, , deadlineMs] = await writeLease();
console.error(`lease ${id} written at ${renewedMs}, deadline ${deadlineMs}`);
const heartbeat = setInterval(() => writeLease().catch((err) => console.error(err)), ttlMs / 3);
const giveUp = setTimeout(() => {
  console.error(`no frame on ${ns}:${stream}:${code} within 20 s`);
  process.exit(1);
}, 20000);

// 3. the first frame, exactly as Upbit sent it
const frame = await firstFrame;
process.stdout.write(`${frame.replace(/\r?\n/g, ' ')}\n`);
clearTimeout(giveUp);
clearInterval(heartbeat);
await client.eval(releaseLua, { keys, arguments: [id] });
await subscriber.close();
await client.close();
