// Bundles the SDK for the browser: one minified ES module with no
// dependency, served by imcloud's demo page (stages/cloud/demo, embedded
// in the binary at build time; never committed) and measured for
// BENCHMARKS.md. Prints its size, minified and gzipped.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { readFileSync, mkdirSync, copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(root, "dist", "imcloud-client.min.js");
await build({
  entryPoints: [join(root, "src", "index.ts")],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  platform: "browser",
  outfile: out,
  legalComments: "none",
});
const min = readFileSync(out);
const demo = join(root, "..", "..", "stages", "cloud", "demo");
mkdirSync(demo, { recursive: true });
copyFileSync(out, join(demo, "imcloud-client.js"));
console.log(`imcloud-client.min.js: ${min.length} bytes minified, ${gzipSync(min, { level: 9 }).length} gzipped`);
