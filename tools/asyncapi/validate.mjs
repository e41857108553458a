// Validate an AsyncAPI document with the official parser (@asyncapi/parser): its schema,
// its references, and its rules. Prints every diagnostic; exits 1 on any error.
//   node validate.mjs ../../docs/asyncapi.json
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node validate.mjs DOCUMENT');
  process.exit(2);
}
const source = resolve(file);
const { document, diagnostics } = await new Parser().parse(await readFile(source, 'utf8'), {
  source,
});
const names = Object.fromEntries(Object.entries(DiagnosticSeverity).map(([k, v]) => [v, k]));
for (const d of diagnostics) {
  console.log(`${names[d.severity].toLowerCase()} ${d.code} at ${d.path.join('.') || '/'}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (document === undefined || errors.length > 0) {
  console.log(`invalid: ${errors.length} errors`);
  process.exit(1);
}
console.log(
  `valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${document.messages().length} messages`,
);
