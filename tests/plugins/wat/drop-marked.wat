;; drop-marked, written by hand in WebAssembly text: an ABI v2 compaction plugin that
;; decides on payloads, read lazily through the host import `switchyard.payload` (see
;; "Reading a payload" in sdk/plugin/README.md).
;;
;; Per channel (v2 may send several): remove every shown message whose stored JSON
;; payload contains the bytes `DROP` (within its first 4096 bytes). A message whose
;; payload reads as -1 (no longer stored: removed since the round's input was built) is
;; kept: there is nothing left to remove. No params. The answer is one bitmap per
;; channel.
;;
;; Memory: a bump allocator from 1024, 8-aligned as v2 requires; nothing is freed (the
;; host instantiates the module afresh for every call). Fresh pages are zero, so the
;; output's bitmaps start clear.
(module
  (import "switchyard" "payload" (func $payload (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $bump (mut i32) (i32.const 1024))

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

  ;; 1 when the payload of message $g (call-wide index) contains `DROP`, read into the
  ;; 4096-byte buffer at $buf; 0 otherwise, and 0 for a payload no longer stored (-1).
  (func $marked (param $g i32) (param $buf i32) (result i32)
    (local $len i32) (local $i i32)
    (local.set $len (call $payload (local.get $g) (local.get $buf) (i32.const 4096)))
    (if (i32.lt_s (local.get $len) (i32.const 4)) (then (return (i32.const 0))))
    (if (i32.gt_s (local.get $len) (i32.const 4096)) (then (local.set $len (i32.const 4096))))
    (block $done
      (loop $scan
        (br_if $done (i32.gt_s (i32.add (local.get $i) (i32.const 4)) (local.get $len)))
        ;; "DROP" as a little-endian u32.
        (if (i32.eq (i32.load (i32.add (local.get $buf) (local.get $i))) (i32.const 0x504f5244))
          (then (return (i32.const 1))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    (i32.const 0))

  ;; The entry point: input at [$p, $p + $l); returns (output ptr << 32) | output len.
  (func (export "switchyard_compaction") (param $p i32) (param $l i32) (result i64)
    (local $nc i32) (local $nm i32) (local $buf i32) (local $out i32) (local $c i32)
    (local $rec i32) (local $start i32) (local $n i32) (local $k i32) (local $d i32) (local $at i32)
    (local.set $nc (i32.load offset=24 (local.get $p)))
    (local.set $nm (i32.load offset=28 (local.get $p)))
    (local.set $buf (call $alloc (i32.const 4096)))
    ;; Header, C answer records, then the bitmaps: at most M/8 + C bytes.
    (local.set $out
      (call $alloc (i32.add (i32.add (i32.const 8) (i32.mul (local.get $nc) (i32.const 17)))
                            (i32.shr_u (local.get $nm) (i32.const 3)))))
    (if (i32.or (i32.eqz (local.get $buf)) (i32.eqz (local.get $out))) (then (return (i64.const -1))))
    (i32.store offset=4 (local.get $out) (local.get $nc))
    (local.set $d (i32.add (i32.const 8) (i32.mul (local.get $nc) (i32.const 16))))
    (block $end
      (loop $channel
        (br_if $end (i32.ge_u (local.get $c) (local.get $nc)))
        (local.set $rec (i32.add (local.get $p) (i32.add (i32.const 32) (i32.mul (local.get $c) (i32.const 48)))))
        (local.set $start (i32.load offset=32 (local.get $rec)))
        (local.set $n (i32.load offset=36 (local.get $rec)))
        ;; Answer record: form 0 (bitmap), n bits, at $d, ceil(n / 8) bytes.
        (local.set $at (i32.add (local.get $out) (i32.add (i32.const 8) (i32.mul (local.get $c) (i32.const 16)))))
        (i32.store offset=4 (local.get $at) (local.get $n))
        (i32.store offset=8 (local.get $at) (local.get $d))
        (i32.store offset=12 (local.get $at) (i32.shr_u (i32.add (local.get $n) (i32.const 7)) (i32.const 3)))
        (local.set $k (i32.const 0))
        (block $done
          (loop $message
            (br_if $done (i32.ge_u (local.get $k) (local.get $n)))
            (if (call $marked (i32.add (local.get $start) (local.get $k)) (local.get $buf))
              (then
                (local.set $at (i32.add (local.get $out) (i32.add (local.get $d) (i32.shr_u (local.get $k) (i32.const 3)))))
                (i32.store8 (local.get $at)
                  (i32.or (i32.load8_u (local.get $at))
                          (i32.shl (i32.const 1) (i32.and (local.get $k) (i32.const 7)))))))
            (local.set $k (i32.add (local.get $k) (i32.const 1)))
            (br $message)))
        (local.set $d (i32.add (local.get $d) (i32.shr_u (i32.add (local.get $n) (i32.const 7)) (i32.const 3))))
        (local.set $c (i32.add (local.get $c) (i32.const 1)))
        (br $channel)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32)) (i64.extend_i32_u (local.get $d))))
)
