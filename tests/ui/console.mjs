// Browser test of the directory's fleet console, driven by client-sim/tests/app_console.rs
// against a running local fleet (deploy/local/fleet.sh). Debian's chromium through
// playwright-core; no browser download. Protocol: lines on stdout ("STEP ...", "DRAIN" when
// the test should drain the relay, "OK" at the end); any failure exits 1 with the reason.
//
// Environment: CONSOLE_URL, OPERATOR_TOKEN, RELAYS (how many relays the page must list),
// DRAIN_TURN (TURN address of the relay that gets drained), SCREENSHOT (PNG path),
// TIMEOUT_MS (bound of every wait, default 30000).
import { chromium } from 'playwright-core';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} not set`);
  return v;
};
const url = env('CONSOLE_URL');
const token = env('OPERATOR_TOKEN');
const relays = Number(env('RELAYS'));
const drainTurn = env('DRAIN_TURN');
const shot = env('SCREENSHOT');
const timeout = Number(process.env.TIMEOUT_MS || 30000);
const step = (s) => console.log(`STEP ${s}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  timeout,
});
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));

  // Without the token: 401 and the login form, no fleet data.
  const first = await page.goto(url);
  if (first.status() !== 401) throw new Error(`without a token: ${first.status()}, want 401`);
  if ((await page.locator('#relays').count()) !== 0) throw new Error('fleet table shown without a token');
  const api = await page.request.get(new URL('/console/api/fleet', url).href);
  if (api.status() !== 401) throw new Error(`fleet API without a token: ${api.status()}`);
  step('refused without the token');

  // A wrong token: refused again.
  await page.fill('#token', 'not-the-operator-token');
  const [wrong] = await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  if (wrong.status() !== 401) throw new Error(`wrong token: ${wrong.status()}`);
  step('refused with a wrong token');

  // The right token: the console, with every relay listed.
  await page.fill('#token', token);
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  const cookies = await context.cookies();
  const c = cookies.find((k) => k.name === 'peerlink_console');
  if (!c || !c.httpOnly || c.sameSite !== 'Strict') throw new Error(`session cookie: ${JSON.stringify(c)}`);
  if ((await page.evaluate(() => document.cookie)).includes('peerlink_console')) {
    throw new Error('the session cookie is readable from script');
  }
  await page.waitForFunction((n) => document.querySelectorAll('#relays tr').length === n, relays);
  await page.waitForFunction(() => document.querySelectorAll('#nodes tr').length >= 1);
  await page.waitForFunction(() => document.querySelectorAll('#replicas tr').length >= 1);
  step(`console shows ${relays} relays`);

  // The latency plot updates while traffic flows: its sample count grows, live (no reload).
  const count = () => page.evaluate(() => Number(document.getElementById('fleet-hdr').getAttribute('data-count') || 0));
  await page.waitForFunction(() => Number(document.getElementById('fleet-hdr').getAttribute('data-count') || 0) > 0);
  const before = await count();
  const loads = await page.evaluate(() => performance.getEntriesByType('navigation').length);
  await page.waitForFunction(
    (b) => Number(document.getElementById('fleet-hdr').getAttribute('data-count') || 0) > b,
    before,
  );
  const after = await count();
  const paths = await page.locator('#fleet-hdr path.line').count();
  if (paths < 1) throw new Error('no curve in the fleet percentile plot');
  const relayCurves = await page.locator(`#relay-plots figure svg path.line`).count();
  if (relayCurves < 1) throw new Error('no per-relay percentile curve');
  if ((await page.evaluate(() => performance.getEntriesByType('navigation').length)) !== loads) {
    throw new Error('the page reloaded');
  }
  step(`latency plot updated live: ${before} -> ${after} samples`);

  // Drain a relay: the console shows it draining.
  console.log('DRAIN');
  await page.waitForFunction(
    (turn) => {
      const row = Array.from(document.querySelectorAll('#relays tr')).find((r) => r.getAttribute('data-turn') === turn);
      return row && row.getAttribute('data-state') === 'draining' && row.textContent.includes('draining');
    },
    drainTurn,
  );
  await page.waitForFunction(() => document.getElementById('c-draining').textContent === '1');
  step(`relay ${drainTurn} shows as draining`);

  if (errors.length) throw new Error(`script errors on the page: ${errors.join('; ')}`);
  await page.screenshot({ path: shot, fullPage: true });
  step(`screenshot ${shot}`);
  console.log('OK');
} catch (e) {
  console.log(`FAIL ${e && e.message ? e.message : e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
