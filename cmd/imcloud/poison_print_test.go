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
