// Drives Debian's Chromium for tests/client_browser.rs: opens the demo page Switchboard serves (so the
// module comes from Switchboard's origin), then runs the commands it reads on stdin, one JSON object
// a line, and writes what happens as JSON lines on stdout (the page's client events included).
//
//   node drive.mjs <demo page URL> <fresh user-data dir>
//
// Commands: {"cmd":"start","options":{…connect options…},"watch":[addresses]}, {"cmd":"open","address"},
// {"cmd":"send","address","from","count"} (messages `b<i>:…`, see message() below),
// {"cmd":"reset","address"}, {"cmd":"stats","address"} (the client's stats, and `matrixSends`: the
// page's to-device sends of messages so far, any peer, retries included), {"cmd":"screenshot","path"},
// {"cmd":"echo"} (from then on every message is sent back to its sender, as `switchboard peer
// --listen` does), {"cmd":"pingpong","address","count","size"} (`switchboard peer --to`'s messages,
// one at a time, each timed until its echo: answers `rtt_ms` p50/p99 and `upgrade_ms`), {"cmd":"quit"}.
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
// What the client handed to Matrix, seen from outside: its PUTs of to-device messages (not acks).
let matrixSends = 0;
page.on('request', (request) => {
  if (request.method() === 'PUT' && request.url().includes('/sendToDevice/m.room.message/')) matrixSends += 1;
});
await page.exposeFunction('report', (object) => out(object));
await page.goto(pageUrl);
await page.waitForFunction(() => window.demo !== undefined, null, { timeout: 10_000 });
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
    const stats = await page.evaluate((address) => window.demo.client.stats(address), address);
    return { stats, matrixSends };
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
        // The Raiden-shaped messages of `switchboard peer` (src/client/peer.rs, message()).
        const message = (index) => {
          const head = JSON.stringify({
            type: 'LockedTransfer', message_identifier: String(index), chain_id: '1',
            nonce: '1', transferred_amount: '0', locked_amount: '1000000000000000',
          });
          const fixed = head.length - 1 + ',"padding":""}'.length;
          return `${head.slice(0, -1)},"padding":"${'x'.repeat(Math.max(0, size - fixed))}"}`;
        };
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
          const expected = message(i);
          const echoed = new Promise((resolve) => { waiting = { expected, resolve }; });
          const started = performance.now();
          await client.send(address, expected);
          await within(echoed, 10_000, `no echo of ${i} in 10 s`);
          rtts.push(performance.now() - started);
        }
        client.removeEventListener('message', onMessage);
        rtts.sort((a, b) => a - b);
        const at = (p) => rtts[Math.round((rtts.length - 1) * p / 100)];
        return { upgrade_ms: upgradeMs, rtt_ms: { p50: at(50), p99: at(99) }, path: client.stats(address)?.path ?? null };
      },
      { address, count, size },
    );
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
