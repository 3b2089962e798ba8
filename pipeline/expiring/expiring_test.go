package expiring

import (
	"runtime"
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestExpiring(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	e := New[string, int](time.Minute)
	e.now, e.rotated = clk.now, clk.t
	e.Put("a", 1)
	clk.t = clk.t.Add(59 * time.Second)
	if v, ok := e.Get("a"); !ok || v != 1 {
		t.Fatalf("a within ttl: %v %v", v, ok)
	}
	clk.t = clk.t.Add(2 * time.Second) // rotation: a moves to the old generation
	e.Put("b", 2)
	if _, ok := e.Get("a"); !ok {
		t.Fatal("a dropped before 2×ttl")
	}
	clk.t = clk.t.Add(61 * time.Second) // rotation: a's generation goes
	if _, ok := e.Get("a"); ok {
		t.Fatal("a kept beyond 2×ttl")
	}
	if _, ok := e.Get("b"); !ok {
		t.Fatal("b dropped within 2×ttl")
	}
	clk.t = clk.t.Add(10 * time.Minute) // idle far longer: everything goes
	if _, ok := e.Get("b"); ok {
		t.Fatal("b kept after a long idle")
	}
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestPutIfAbsent(t *testing.T) {
	e := New[string, struct{}](time.Minute)
	if !e.PutIfAbsent("a", struct{}{}) || e.PutIfAbsent("a", struct{}{}) {
		t.Fatal("PutIfAbsent stored twice or not at all")
	}
}

func TestSet(t *testing.T) {
	s := NewSet(time.Minute)
	ids := []string{
		"6ba7b810-9dad-11d1-80b4-00c04fd430c8",
		"6BA7B810-9DAD-11D1-80B4-00C04FD430C9",
		"idempotency:order-42",
		"",
		"not-a-uuid-but-exactly-36-chars-long",
	}
	for _, id := range ids {
		if s.Has(id) {
			t.Fatalf("%q present before it was added", id)
		}
		if !s.AddIfAbsent(id) {
			t.Fatalf("%q not added", id)
		}
	}
	for _, id := range ids {
		if !s.Has(id) || s.AddIfAbsent(id) {
			t.Fatalf("%q not remembered", id)
		}
	}
	if s.Has("6ba7b810-9dad-11d1-80b4-00c04fd430ca") || s.Has("idempotency:order-43") {
		t.Fatal("an id never added is present")
	}
	s.Add("x")
	if !s.Has("x") {
		t.Fatal("Add did not remember")
	}
}

// BenchmarkSetMemory reports the heap one remembered UUID costs.
func BenchmarkSetMemory(b *testing.B) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	s := NewSet(time.Hour)
	for range b.N {
		s.Add(uuid.NewString())
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(b.N), "B/id")
	runtime.KeepAlive(s)
}

func TestSetPairs(t *testing.T) {
	s := NewSet(time.Minute)
	if !s.AddPairIfAbsent("m1", "k1") || s.AddPairIfAbsent("m1", "k1") {
		t.Fatal("a pair is remembered once")
	}
	// The separator keeps ("m", "1k1") apart from ("m1", "k1").
	if !s.AddPairIfAbsent("m", "1k1") || !s.AddPairIfAbsent("m1", "k2") {
		t.Fatal("other pairs are not the same pair")
	}
	s.RemovePair("m1", "k1")
	if !s.AddPairIfAbsent("m1", "k1") {
		t.Fatal("a removed pair is new again")
	}
}
