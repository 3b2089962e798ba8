package memory

import (
	"testing"
	"time"
)

func TestExpiring(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	e := newExpiring[int](time.Minute)
	e.now, e.rotated = clk.now, clk.t
	e.put("a", 1)
	clk.t = clk.t.Add(59 * time.Second)
	if v, ok := e.get("a"); !ok || v != 1 {
		t.Fatalf("a within ttl: %v %v", v, ok)
	}
	clk.t = clk.t.Add(2 * time.Second) // rotation: a moves to the old generation
	e.put("b", 2)
	if _, ok := e.get("a"); !ok {
		t.Fatal("a dropped before 2×ttl")
	}
	clk.t = clk.t.Add(61 * time.Second) // rotation: a's generation goes
	if _, ok := e.get("a"); ok {
		t.Fatal("a kept beyond 2×ttl")
	}
	if _, ok := e.get("b"); !ok {
		t.Fatal("b dropped within 2×ttl")
	}
	clk.t = clk.t.Add(10 * time.Minute) // idle far longer: everything goes
	if _, ok := e.get("b"); ok {
		t.Fatal("b kept after a long idle")
	}
}
