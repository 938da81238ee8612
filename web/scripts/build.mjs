// Builds the browser app into headforge/service/static/, which the service mounts at `/`.
// Usage: node scripts/build.mjs [--watch]
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const web = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const out = resolve(web, '..', 'headforge', 'service', 'static');
const watch = process.argv.includes('--watch');

await mkdir(out, { recursive: true });

const options = {
  entryPoints: { app: join(web, 'src', 'main.js'), 'app-style': join(web, 'src', 'app.css') },
  outdir: out,
  bundle: true,
  format: 'esm',
  target: ['es2020', 'chrome100', 'firefox100', 'safari15'],
  minify: !watch,
  sourcemap: watch ? 'inline' : false,
  legalComments: 'none',
  logLevel: 'warning',
  entryNames: '[name]',
};

// The stylesheet is emitted as app-style.css; index.html links app.css.
async function finish() {
  const css = await readFile(join(out, 'app-style.css'));
  await writeFile(join(out, 'app.css'), css);
  const { rm } = await import('node:fs/promises');
  await rm(join(out, 'app-style.css'), { force: true });
  await copyFile(join(web, 'index.html'), join(out, 'index.html'));
  const bundled = [
    ['three.js (https://threejs.org)', 'three'],
    ['Spark (https://sparkjs.dev, @sparkjsdev/spark)', join('@sparkjsdev', 'spark')],
    ['fflate (https://github.com/101arrowz/fflate)', 'fflate'],
  ];
  const parts = [];
  for (const [name, folder] of bundled) {
    const license = await readFile(join(web, 'node_modules', folder, 'LICENSE'), 'utf8');
    parts.push(`app.js bundles ${name}, MIT License:\n\n${license.trim()}\n`);
  }
  await writeFile(join(out, 'THIRD_PARTY_LICENSES.txt'), parts.join('\n'));
}

if (watch) {
  const ctx = await esbuild.context({
    ...options,
    plugins: [{ name: 'finish', setup(build) { build.onEnd(() => finish()); } }],
  });
  await ctx.watch();
  console.log(`watching; writing into ${out}`);
} else {
  await esbuild.build(options);
  await finish();
  console.log(`built into ${out}`);
}
