package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"imcloud/cmd/imcloud/internal/process"
	"imcloud/pipeline"
)

// TestPrintPoisonListEscapes: what a publisher wrote into a poisoned
// message (its id, the reason and handler metadata) reaches the operator's
// terminal escaped and cut: no escape sequence, no forged row or column.
func TestPrintPoisonListEscapes(t *testing.T) {
	long := strings.Repeat("é", 1000)
	tests := []struct {
		name  string
		entry process.PoisonEntry
		want  []string // substrings of the printed row
	}{
		{"escape sequences", process.PoisonEntry{ID: "a\x1b[2J\x1b]0;pwned\x07", Handler: "h", Reason: "r"}, []string{`a\x1b[2J\x1b]0;pwned\a`}},
		{"forged row", process.PoisonEntry{ID: "b", Handler: "h", Reason: "r\nforged\t2026-01-01T00:00:00Z\tjob\tok"}, []string{`r\nforged\t2026-01-01T00:00:00Z\tjob\tok`}},
		{"forged column", process.PoisonEntry{ID: "c\td", Handler: "h\re", Reason: "r"}, []string{`c\td`, `h\re`}},
		{"invalid utf-8 and bidi", process.PoisonEntry{ID: "\xff\xfe", Handler: "h", Reason: "x\u202eevil\\"}, []string{`\xff\xfe`, `x\u202eevil\\`}},
		{"undecodable", process.PoisonEntry{ID: "1-0", Undecodable: "bad\x1b[31m"}, []string{`UNDECODABLE: bad\x1b[31m`}},
		{"cut", process.PoisonEntry{ID: "d", Handler: "h", Reason: long}, []string{strings.Repeat("é", 200) + "…[cut]"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			tt.entry.PoisonedAt = time.Unix(0, 0)
			if err := printPoisonList(&out, "poison\x1b]0;t\x07", []process.PoisonEntry{tt.entry}, false); err != nil {
				t.Fatal(err)
			}
			s := out.String()
			if !utf8.ValidString(s) {
				t.Errorf("output is not valid UTF-8: %q", s)
			}
			if i := strings.IndexFunc(s, func(r rune) bool { return r != '\n' && (unicode.IsControl(r) || unicode.Is(unicode.Cf, r)) }); i >= 0 {
				t.Errorf("output carries a control or format character at %d: %q", i, s)
			}
			if lines := strings.Count(s, "\n"); lines != 3 {
				t.Errorf("%d lines, want header, one row, count:\n%s", lines, s)
			}
			for _, w := range tt.want {
				if !strings.Contains(s, w) {
					t.Errorf("output lacks %q:\n%s", w, s)
				}
			}
			if strings.Contains(s, strings.Repeat("é", 201)) {
				t.Errorf("a column longer than %d runes was printed whole", maxColumn)
			}
		})
	}
}

// TestPoisonErrorsEscaped: an error of imcloud poison (which may carry an
// entry's name or a relayed reason) is escaped, and still wraps its cause.
func TestPoisonErrorsEscaped(t *testing.T) {
	cause := errors.New("cause")
	err := escapedErr(errors.Join(errors.New("left \x1b[2J"), cause))
	if strings.ContainsRune(err.Error(), 0x1b) || !strings.Contains(err.Error(), `left \x1b[2J`) {
		t.Errorf("error %q not escaped", err)
	}
	if !errors.Is(err, cause) {
		t.Error("escaped error lost its cause")
	}
	if escapedErr(nil) != nil {
		t.Error("escapedErr(nil) is not nil")
	}
}

// TestReplayedLine: what imcloud poison replay says of where messages
// went, in shard order, with a topic from another process escaped.
func TestReplayedLine(t *testing.T) {
	shards := []string{"p.0", "p.1", "p.2", "p.10"}
	tests := []struct {
		name string
		r    pipeline.Replayed
		want string
	}{
		{"none", nil, "replayed 0 message(s)"},
		{"one shard", pipeline.Replayed{"p.1": 3}, "replayed 3 message(s) to p.1"},
		{"shard order", pipeline.Replayed{"p.10": 1, "p.2": 2, "p.0": 4}, "replayed 7 message(s): 4 to p.0, 2 to p.2, 1 to p.10"},
		{"zero counts left out", pipeline.Replayed{"p.0": 0, "p.1": 1}, "replayed 1 message(s) to p.1"},
		{"a topic not a shard, escaped", pipeline.Replayed{"p.0": 1, "x\x1b[2J": 1}, `replayed 2 message(s): 1 to p.0, 1 to x\x1b[2J`},
	}
	for _, tt := range tests {
		if got := replayedLine(tt.r, shards); got != tt.want {
			t.Errorf("%s: %q, want %q", tt.name, got, tt.want)
		}
	}
}
