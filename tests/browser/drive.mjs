// Drives Debian's Chromium for tests/client_browser.rs: opens the demo page Switchboard serves (so the
// module comes from Switchboard's origin), then runs the commands it reads on stdin, one JSON object
// a line, and writes what happens as JSON lines on stdout (the page's client events included).
//
//   node drive.mjs <demo page URL> <fresh user-data dir>
//
// Commands: {"cmd":"start","options":{…connect options…},"watch":[addresses]}, {"cmd":"open","address"},
// {"cmd":"send","address","from","count"} (messages `b<i>:…`, see message() below),
// {"cmd":"reset","address"}, {"cmd":"stats","address"}, {"cmd":"screenshot","path"}, {"cmd":"quit"}.
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
out({ ev: 'loaded' });

const commands = {
  async start({ options, watch }) {
    await page.evaluate(
      async ({ options, watch }) => {
        const text = new TextDecoder();
        const sum = (bytes) => bytes.reduce((acc, b) => (acc * 31 + b) >>> 0, 7);
        await window.demo.start(options, watch, (type, detail) => {
          if (type === 'message') {
            const all = text.decode(detail.bytes);
            window.report({ ev: 'message', from: detail.address, len: detail.bytes.length, head: all.slice(0, 12), sum: sum(detail.bytes) });
          } else {
            window.report({ ev: type, ...detail });
          }
        });
        return window.demo.client.userId;
      },
      { options, watch },
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
