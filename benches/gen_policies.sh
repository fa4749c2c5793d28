#!/usr/bin/env bash
# Prints N policies in YAML, the mix benches/policy.rs matches against (static
# and parameterised paths, several methods, every tenth bound to a host), so
# that the pass-through runs match against a realistic table:
#
#   benches/gen_policies.sh 1000 > generated.yaml
#
# None of them covers GET /, the pass-through benchmarks' call.
set -euo pipefail
n=${1:?usage: gen_policies.sh <count>}
echo "policies:"
for ((i = 0; i < n; i++)); do
  case $((i % 4)) in
    0) methods='[POST]'; path="/api/v1/shop$i/orders" ;;
    1) methods='[DELETE, PUT]'; path="/api/v1/shop$i/orders/{orderId}" ;;
    2) methods='[POST]'; path="/api/v1/shop$i/items/{itemId}/buy" ;;
    *) methods='["*"]'; path="/admin$i/{*rest}" ;;
  esac
  host=""
  if ((i % 10 == 9)); then host=", host: api$i.example"; fi
  printf '  - name: gen%d\n    match: { methods: %s, path: "%s"%s }\n' "$i" "$methods" "$path" "$host"
  printf '    require: { scopes: [product:buy], audience: https://shop.example/api }\n'
  printf '    binding_message: "Do you want to buy {{qty}} {{product}}"\n'
done
