package redis

import "testing"

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
