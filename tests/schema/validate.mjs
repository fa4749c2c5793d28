// Validates YAML documents against Countersign's JSON Schemas with Ajv, a
// validator independent of the Rust code that generates them.
//
// stdin:  {"schemas": {"<kind>": "<schema file>", ...},
//          "documents": [{"name": "...", "kind": "<kind>", "text": "<yaml>"}, ...]}
// stdout: [{"name": "...", "valid": true|false, "errors": ["..."]}, ...]
import fs from 'node:fs';
import Ajv from 'ajv';
import addFormats from 'ajv-formats';
import YAML from 'yaml';

const input = JSON.parse(fs.readFileSync(0, 'utf8'));

// Strict: a schema Ajv finds questionable fails the run instead of being
// half-applied. Union types ("string" or null) are what Option<T> becomes.
const ajv = new Ajv({ allErrors: true, strict: true, allowUnionTypes: true });
addFormats(ajv);
// schemars annotates integers with their Rust width; nothing to check.
for (const format of ['uint', 'uint8', 'uint16', 'uint32', 'uint64', 'int8', 'int16', 'int32', 'int64', 'float', 'double']) {
  ajv.addFormat(format, true);
}

const validators = {};
for (const [kind, file] of Object.entries(input.schemas)) {
  validators[kind] = ajv.compile(JSON.parse(fs.readFileSync(file, 'utf8')));
}

const results = input.documents.map(({ name, kind, text }) => {
  const validate = validators[kind];
  if (!validate) throw new Error(`${name}: no schema for kind ${kind}`);
  let data;
  try {
    // YAML 1.2 core schema, duplicate keys refused: as serde_yaml reads it.
    data = YAML.parse(text, { uniqueKeys: true });
  } catch (error) {
    return { name, valid: false, errors: [`YAML: ${error.message}`] };
  }
  const valid = validate(data);
  const errors = valid ? [] : validate.errors.map((e) => `${e.instancePath || '/'} ${e.message}`);
  return { name, valid, errors };
});
process.stdout.write(JSON.stringify(results));
