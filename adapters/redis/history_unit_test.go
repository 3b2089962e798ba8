package redis

import (
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"imcloud/pipeline"
)

func TestHistoryLuaOverhead(t *testing.T) {
	if !strings.Contains(historyLua, "local OVERHEAD = "+strconv.Itoa(pipeline.EntryOverhead)+" ") {
		t.Fatalf("the scripts' OVERHEAD is not pipeline.EntryOverhead (%d)", pipeline.EntryOverhead)
	}
}

func TestHistoryEntryEncoding(t *testing.T) {
	for _, e := range []pipeline.HistoryEntry{
		{ID: "id-1", Op: 1000, Body: []byte("hello"), At: time.Unix(1_700_000_000, 123)},
		{Op: -1},
		{ID: strings.Repeat("i", 300), Body: make([]byte, 1<<16), At: time.Unix(0, 1)},
		{ID: "keyed", Op: 1001, Body: []byte("to two keys"), Keys: []string{"k1", strings.Repeat("k", 300)}},
		{ID: "empty key", Keys: []string{""}},
	} {
		b := encodeEntry(e)
		got, err := decodeLogEntry([]any{"7-1700000000000", []any{"e", string(b)}})
		if err != nil {
			t.Fatal(err)
		}
		if got.Pos != 7 || got.ID != e.ID || got.Op != e.Op || string(got.Body) != string(e.Body) || !got.At.Equal(e.At) || !slices.Equal(got.Keys, e.Keys) {
			t.Fatalf("decoded %+v, want %+v", got, e)
		}
	}
	for _, bad := range []any{
		"x",
		[]any{"7-1", []any{"e", "short"}},
		[]any{"x-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{}))}},
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc"}))[:13]}},
		// No key count after the id.
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc"}))[:16]}},
		// A key count past the bytes left, a key cut short.
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc"}))[:16] + "\xff\xff\xff\xff\x0f"}},
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc", Keys: []string{"key"}}))[:19]}},
	} {
		if _, err := decodeLogEntry(bad); err == nil {
			t.Fatalf("decoded %v", bad)
		}
	}
}
