package redis

import (
	"strings"
	"testing"
	"time"
)

// TestKeySlot: the slots CLUSTER KEYSLOT answered on a Redis 7.0 cluster
// (scripts/services.sh redis-cluster), hash tags and their edge cases
// included.
func TestKeySlot(t *testing.T) {
	for key, want := range map[string]int{
		"":                                     0,
		"foo":                                  12182,
		"bar":                                  5061,
		"a":                                    15495,
		"b":                                    3300,
		"c":                                    7365,
		"123456789":                            12739,
		"é":                                    10180,
		"{user1000}.following":                 3443,
		"imcloud:{nodes}":                      9928,
		"imcloud:history:{room:live://1}:meta": 7891,
		"{}foo":                                9500, // an empty tag: the whole key
		"foo{}{bar}":                           8363, // the first '{' decides, and its tag is empty
		"foo{{bar}}zap":                        4015, // the tag is "{bar"
		"foo{bar}{zap}":                        5061, // the first tag only: "bar"
		"{bar":                                 4015, // no '}': the whole key
		"}bar{":                                1498,
	} {
		if got := keySlot(key); got != want {
			t.Errorf("keySlot(%q) = %d, want %d", key, got, want)
		}
	}
}

// TestCRC16: the CRC-16/XMODEM check value.
func TestCRC16(t *testing.T) {
	if got := crc16("123456789"); got != 0x31c3 {
		t.Fatalf("crc16(\"123456789\") = %#x, want 0x31c3", got)
	}
}

// TestReplyKeysAreDigests: an Idempotency-Key is the caller's to choose,
// so it never becomes a Redis key as it is: one holding {tag} must not
// pin replies to a Cluster slot of its choosing, and two keys must not
// meet.
func TestReplyKeysAreDigests(t *testing.T) {
	r := NewReplies(nil, "p:", time.Minute)
	a, b := r.redisKey("{hot}one"), r.redisKey("{hot}two")
	for _, k := range []string{a, b} {
		if strings.ContainsAny(k, "{}") || len(k) != len("p:v4:")+32 {
			t.Fatalf("reply key %q: want p:v4: and 32 hex digits", k)
		}
	}
	if a == b || keySlot(a) == keySlot(b) && keySlot(a) == keySlot("hot") {
		t.Fatalf("two keys tagged {hot} share %q / slot %d", a, keySlot(a))
	}
}
