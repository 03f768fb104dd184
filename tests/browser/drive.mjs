// Drives Debian's Chromium for tests/client_browser.rs: opens the demo page Switchboard serves (so the
// module comes from Switchboard's origin), then runs the commands it reads on stdin, one JSON object
// a line, and writes what happens as JSON lines on stdout (the page's client events included).
//
//   node drive.mjs <demo page URL> <fresh user-data dir>
//
// Commands: {"cmd":"start","options":{…connect options…},"watch":[addresses]}, {"cmd":"open","address"},
// {"cmd":"send","address","from","count"} (messages `b<i>:…`),
// {"cmd":"reset","address"}, {"cmd":"stats","address"} (the client's stats()), {"cmd":"screenshot","path"},
// {"cmd":"echo"} (from then on every message is sent back to its sender, as `switchboard peer
// --listen` does), {"cmd":"pingpong","address","count","size"} (`switchboard peer --to`'s messages,
// one at a time, each timed until its echo: answers `rtt_ms`, every round trip, and `upgrade_ms`),
// and for benches/client_pairs.rs: {"cmd":"stamp"} (from then on every message's one-way latency is
// recorded from its `sent_ms` wall-clock stamp, and the message echoed), {"cmd":"oneway"} (answers
// the recorded latencies `ms` and forgets them), {"cmd":"payer","role","addresses":{"I","M","T"}}
// (plays `role` of a 1-mediator payment, as driven_peer.py's Payer does: reports
// {"ev":"paid","payment","last_ms"} when its last message of a payment came), {"cmd":"quit"}.
// Each is answered {"ev":"done","cmd",…} or {"ev":"failed","cmd","error"}.
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

// playwright-core from SWITCHBOARD_TEST_BROWSER_MODULES (tests/browser-tools prints it), else the
// node_modules next to this script.
const modules = process.env.SWITCHBOARD_TEST_BROWSER_MODULES ?? join(import.meta.dirname, 'node_modules');
const { chromium } = await import(pathToFileURL(join(modules, 'playwright-core', 'index.mjs')).href);

const [pageUrl, userDataDir] = process.argv.slice(2);
const out = (object) => process.stdout.write(`${JSON.stringify(object)}\n`);

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1000, height: 640 },
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
  ],
});
const page = context.pages()[0] ?? (await context.newPage());
page.on('pageerror', (error) => out({ ev: 'pageerror', error: String(error) }));
// Every console line, so the test can check that no token is ever logged.
page.on('console', (message) => out({ ev: 'console', type: message.type(), text: message.text() }));
await page.exposeFunction('report', (object) => out(object));
await page.goto(pageUrl);
await page.waitForFunction(() => window.demo !== undefined, null, { timeout: 10_000 });
// The benchmark's messages and clock in the page (as driven_peer.py's bench_message and now_ms):
// Raiden-shaped JSON of `size` bytes stamped with the wall-clock time in milliseconds.
await page.evaluate(() => {
  const nowMs = () => performance.timeOrigin + performance.now();
  const message = (type, payment, hop, ident, size) => {
    const head = JSON.stringify({ type, payment, hop, message_identifier: String(ident), sent_ms: nowMs() });
    const fixed = head.length - 1 + ',"padding":""}'.length;
    return `${head.slice(0, -1)},"padding":"${'x'.repeat(Math.max(0, size - fixed))}"}`;
  };
  window.bench = { nowMs, message, oneway: [] };
});
out({ ev: 'loaded' });

const commands = {
  async start({ options, watch, quiet }) {
    await page.evaluate(
      async ({ options, watch, quiet }) => {
        const text = new TextDecoder();
        const sum = (bytes) => bytes.reduce((acc, b) => (acc * 31 + b) >>> 0, 7);
        await window.demo.start(options, watch, (type, detail) => {
          if (type === 'message') {
            if (quiet) return;
            const all = text.decode(detail.bytes);
            window.report({ ev: 'message', from: detail.address, len: detail.bytes.length, head: all.slice(0, 12), sum: sum(detail.bytes) });
          } else {
            window.report({ ev: type, ...detail });
          }
        });
        return window.demo.client.userId;
      },
      { options, watch, quiet: Boolean(quiet) },
    );
    return {};
  },
  async open({ address }) {
    await page.evaluate((address) => window.demo.client.open(address), address);
    return {};
  },
  async send({ address, from, count }) {
    const started = Date.now();
    await page.evaluate(
      async ({ address, from, count }) => {
        for (let i = from; i < from + count; i++) {
          // Message 50 is 40,002 bytes of two-byte characters: three fragments cut at characters.
          const body = i === 50 ? 'é'.repeat(20_000) : 'x'.repeat(60);
          await window.demo.client.send(address, `b${i}:${body}`);
        }
      },
      { address, from, count },
    );
    return { ms: Date.now() - started };
  },
  async reset({ address }) {
    await page.evaluate((address) => window.demo.client.resetChannel(address), address);
    return {};
  },
  async stats({ address }) {
    return { stats: await page.evaluate((address) => window.demo.client.stats(address), address) };
  },
  async echo() {
    await page.evaluate(() => {
      const client = window.demo.client;
      client.addEventListener('message', (event) => {
        client.send(event.detail.address, event.detail.bytes).catch(() => {});
      });
    });
    return {};
  },
  async pingpong({ address, count, size }) {
    return await page.evaluate(
      async ({ address, count, size }) => {
        const client = window.demo.client;
        // `promise`, or an error after `ms` (the timer cleared either way).
        const within = (promise, ms, what) => {
          let timer;
          const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what)), ms); });
          return Promise.race([promise, late]).finally(() => clearTimeout(timer));
        };
        const text = new TextDecoder();
        let waiting = null;
        const onMessage = (event) => {
          if (waiting && text.decode(event.detail.bytes) === waiting.expected) waiting.resolve();
        };
        const up = new Promise((resolve) => {
          const onUp = (event) => {
            if (event.detail.address.toLowerCase() === address.toLowerCase()) resolve();
          };
          client.addEventListener('channelup', onUp);
        });
        client.addEventListener('message', onMessage);
        const called = performance.now();
        await client.open(address);
        // Past the module's 30 s call timeout and its retry: a first call that never comes up shows as
        // an upgrade of 30 s and more instead of failing the run.
        await within(up, 75_000, 'no channel in 75 s');
        const upgradeMs = performance.now() - called;
        const rtts = [];
        for (let i = 0; i < count; i++) {
          const expected = window.bench.message('LockedTransfer', 0, 0, i, size);
          const echoed = new Promise((resolve) => { waiting = { expected, resolve }; });
          const started = performance.now();
          await client.send(address, expected);
          await within(echoed, 10_000, `no echo of ${i} in 10 s`);
          rtts.push(performance.now() - started);
        }
        client.removeEventListener('message', onMessage);
        return { upgrade_ms: upgradeMs, rtt_ms: rtts, path: client.stats(address)?.path ?? null };
      },
      { address, count, size },
    );
  },
  async stamp() {
    await page.evaluate(() => {
      const client = window.demo.client;
      const text = new TextDecoder();
      client.addEventListener('message', (event) => {
        const arrived = window.bench.nowMs();
        window.bench.oneway.push(arrived - JSON.parse(text.decode(event.detail.bytes)).sent_ms);
        client.send(event.detail.address, event.detail.bytes).catch(() => {});
      });
    });
    return {};
  },
  async oneway() {
    return { ms: await page.evaluate(() => window.bench.oneway.splice(0)) };
  },
  async payer({ role, addresses }) {
    await page.evaluate(
      ({ role, addresses }) => {
        // The 8 hops of a 1-mediator payment (benches/client.rs, HOPS).
        const HOPS = [
          ['I', 'M', 'LockedTransfer', 3200, true], ['M', 'T', 'LockedTransfer', 3200, true],
          ['T', 'I', 'SecretRequest', 536, false], ['I', 'T', 'RevealSecret', 297, false],
          ['T', 'M', 'RevealSecret', 297, false], ['M', 'I', 'RevealSecret', 297, false],
          ['I', 'M', 'Unlock', 568, true], ['M', 'T', 'Unlock', 568, true],
        ];
        const expected = HOPS.reduce((n, [from, to, , , processed]) =>
          n + (to === role ? 1 : 0) + (from === role ? 1 + (processed ? 1 : 0) : 0), 0);
        const client = window.demo.client;
        const text = new TextDecoder();
        const arrived = new Map();
        let ident = 0;
        // Sends are queued in call order (send() takes a message synchronously when it has room).
        const send = (to, type, payment, hop, size) => {
          ident += 1;
          client.send(addresses[to], window.bench.message(type, payment, hop, ident, size))
            .catch((error) => console.error(`payer: a send to ${to} failed: ${error}`));
        };
        client.addEventListener('message', (event) => {
          const arrivedMs = window.bench.nowMs();
          const { type, payment, hop } = JSON.parse(text.decode(event.detail.bytes));
          if (type !== 'Processed' && type !== 'Delivered') {
            const [from, , , , processed] = HOPS[hop];
            if (processed) send(from, 'Processed', payment, hop, 216);
            send(from, 'Delivered', payment, hop, 226);
            const next = HOPS[hop + 1];
            if (next && next[0] === role) send(next[1], next[2], payment, hop + 1, next[3]);
          }
          const count = (arrived.get(payment) ?? 0) + 1;
          arrived.set(payment, count);
          if (count === expected) {
            arrived.delete(payment);
            window.report({ ev: 'paid', payment, last_ms: arrivedMs });
          }
        });
      },
      { role, addresses },
    );
    return {};
  },
  async screenshot({ path }) {
    await page.waitForTimeout(1200);
    await page.screenshot({ path, fullPage: true });
    return {};
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.cmd === 'quit') break;
  try {
    const result = await commands[command.cmd](command);
    out({ ev: 'done', cmd: command.cmd, ...result });
  } catch (error) {
    out({ ev: 'failed', cmd: command.cmd, error: String(error?.message ?? error) });
  }
}
await context.close();
out({ ev: 'closed' });
// stdin, still open, would keep node running (the test's quit then waited its full 10 s).
process.exit(0);
