;; keep-last, written by hand in WebAssembly text: an ABI v2 retention plugin with no
;; SDK and no toolchain beyond a WAT assembler (`wat2wasm keep-last.wat`, or wasmtime's
;; and the `wat` crate's text support). It shows the v2 layout of sdk/plugin/README.md
;; from the guest's side.
;;
;; Params: the first run of decimal digits in the params text is `count`, so
;; `{"count": 1000}` works (any other JSON shape is not checked). No digits at all is
;; the guest error "missing param count". count = 0 keeps everything.
;;
;; Per channel (v2 may send several): when stats.count > count, drop the oldest
;; min(stats.count - count, shown) messages, i.e. answer DropBelow(offset of the last
;; of them + 1); otherwise Keep (0). The same decisions as plugins/keep-last.
;;
;; Memory: a bump allocator from 1024, 8-aligned as v2 requires; nothing is freed (the
;; host instantiates the module afresh for every call).
(module
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 1024))
  ;; The error answer: status 1, length 19, the message.
  (data (i32.const 16) "\01\00\00\00\13\00\00\00missing param count")

  ;; The ABI v2 marker (never called).
  (func (export "switchyard_abi_v2"))

  ;; `len` bytes, 8-aligned; 0 when memory cannot grow.
  (func $alloc (export "switchyard_alloc") (param $n i32) (result i32)
    (local $p i32) (local $end i32)
    (local.set $p (global.get $bump))
    (local.set $end (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow (i32.sub (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16))
                                    (memory.size)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $bump (local.get $end))
    (local.get $p))

  ;; The entry point: input at [$p, $p + $l); returns (output ptr << 32) | output len.
  (func (export "switchyard_retention") (param $p i32) (param $l i32) (result i64)
    (local $params i32) (local $plen i32) (local $i i32) (local $c i32) (local $seen i32)
    (local $count i64) (local $nch i32) (local $msgs i32) (local $out i32) (local $outlen i32)
    (local $k i32) (local $ch i32) (local $rec i32) (local $total i64) (local $drop i64)

    ;; Header: params at +16 (offset from $p) / +20 (length).
    (local.set $params (i32.add (local.get $p) (i32.load offset=16 (local.get $p))))
    (local.set $plen (i32.load offset=20 (local.get $p)))
    (block $done
      (loop $scan
        (br_if $done (i32.ge_u (local.get $i) (local.get $plen)))
        (local.set $c (i32.load8_u (i32.add (local.get $params) (local.get $i))))
        (if (i32.and (i32.ge_u (local.get $c) (i32.const 48)) (i32.le_u (local.get $c) (i32.const 57)))
          (then
            (local.set $count
              (i64.add (i64.mul (local.get $count) (i64.const 10))
                       (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
            (local.set $seen (i32.const 1)))
          (else (br_if $done (local.get $seen))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (if (i32.eqz (local.get $seen))
      (then (return (i64.const 0x100000001b))))   ;; the error answer at 16, 27 bytes

    ;; Header: channel count at +24; channel records (48 bytes) from +32; message
    ;; records (32 bytes) right after them.
    (local.set $nch (i32.load offset=24 (local.get $p)))
    (local.set $msgs (i32.add (local.get $p) (i32.add (i32.const 32) (i32.mul (local.get $nch) (i32.const 48)))))

    ;; Output: status 0, the channel count, one 16-byte result record per channel.
    (local.set $outlen (i32.add (i32.const 8) (i32.shl (local.get $nch) (i32.const 4))))
    (local.set $out (call $alloc (local.get $outlen)))
    (if (i32.eqz (local.get $out)) (then (return (i64.const -1))))
    (i32.store (local.get $out) (i32.const 0))
    (i32.store offset=4 (local.get $out) (local.get $nch))

    (block $end
      (loop $each
        (br_if $end (i32.ge_u (local.get $k) (local.get $nch)))
        (local.set $ch (i32.add (local.get $p) (i32.add (i32.const 32) (i32.mul (local.get $k) (i32.const 48)))))
        (local.set $rec (i32.add (local.get $out) (i32.add (i32.const 8) (i32.shl (local.get $k) (i32.const 4)))))
        (i64.store (local.get $rec) (i64.const 0))            ;; drop_below 0 = Keep
        (i64.store offset=8 (local.get $rec) (i64.const 0))   ;; reserved
        (local.set $total (i64.load offset=16 (local.get $ch)))   ;; stats.count
        (if (i32.and (i64.ne (local.get $count) (i64.const 0)) (i64.gt_u (local.get $total) (local.get $count)))
          (then
            (local.set $drop (i64.sub (local.get $total) (local.get $count)))
            ;; at most the messages shown (channel record +36: its message count)
            (if (i64.gt_u (local.get $drop) (i64.extend_i32_u (i32.load offset=36 (local.get $ch))))
              (then (local.set $drop (i64.extend_i32_u (i32.load offset=36 (local.get $ch))))))
            (if (i64.ne (local.get $drop) (i64.const 0))
              (then
                ;; offset (+0) of message (first index (+32) + drop - 1), plus one
                (i64.store (local.get $rec)
                  (i64.add (i64.const 1)
                    (i64.load
                      (i32.add (local.get $msgs)
                        (i32.shl
                          (i32.add (i32.load offset=32 (local.get $ch))
                                   (i32.wrap_i64 (i64.sub (local.get $drop) (i64.const 1))))
                          (i32.const 5))))))))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $each)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32)) (i64.extend_i32_u (local.get $outlen)))))
