// Validate glTF 2.0 files with the Khronos validator and print one JSON report per file.
// Usage: node validate.mjs FILE.glb [FILE.gltf ...]
// Exit status: 0 when no file has errors, 1 when any has, 2 on bad usage or unreadable files.
import { readFile } from "node:fs/promises";
import path from "node:path";
import validator from "gltf-validator";

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE.glb [...]");
  process.exit(2);
}

let failed = false;
for (const file of files) {
  let bytes;
  try {
    bytes = new Uint8Array(await readFile(file));
  } catch (error) {
    console.error(`${file}: ${error.message}`);
    process.exit(2);
  }
  const report = await validator.validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues: 200,
    externalResourceFunction: (uri) =>
      readFile(path.resolve(path.dirname(file), decodeURIComponent(uri))).then((data) => new Uint8Array(data)),
  });
  const { numErrors, numWarnings, numInfos, numHints } = report.issues;
  console.log(JSON.stringify({ file, numErrors, numWarnings, numInfos, numHints, messages: report.issues.messages }));
  if (numErrors > 0) failed = true;
}
process.exit(failed ? 1 : 0);
