// Copies the broker's API contract (the repository's protos/qbo/broker/v1/broker.proto)
// into this package, so the built package carries the proto it was built against.
// Run by `npm run build`. Writes only when the content changed (mtimes stay put).
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const packageDir = fileURLToPath(new URL("..", import.meta.url));
const relativePath = join("qbo", "broker", "v1", "broker.proto");
const source = join(packageDir, "..", "..", "protos", relativePath);
const target = join(packageDir, "protos", relativePath);

if (!existsSync(source)) {
  if (existsSync(target)) {
    console.log(`copy-protos: ${source} not found; keeping ${relative(packageDir, target)}`);
    process.exit(0);
  }
  console.error(`copy-protos: ${source} not found (build this package inside the repository)`);
  process.exit(1);
}
const wanted = readFileSync(source);
if (existsSync(target) && readFileSync(target).equals(wanted)) {
  process.exit(0);
}
mkdirSync(dirname(target), { recursive: true });
writeFileSync(target, wanted);
console.log(`copy-protos: ${relative(packageDir, target)} updated from the repository`);
