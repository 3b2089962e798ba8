package memory

import (
	"testing"
	"time"

	"imcloud/pipeline"
)

// TestHistoryVoidLetsBodiesGo: a voided entry's body is let go at once and
// the store's byte total says so, so the caps count only what is held; the
// same entry in another stream of its Append keeps its body.
func TestHistoryVoidLetsBodiesGo(t *testing.T) {
	ctx := t.Context()
	h := NewHistory(pipeline.HistoryCaps{})
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: time.Hour} }
	ps, err := h.Append(ctx, []string{"user:1", "user:2"}, pipeline.HistoryEntry{ID: "m", Body: make([]byte, 10_000), Keys: []string{"k"}}, limit)
	if err != nil {
		t.Fatal(err)
	}
	_, before := h.Size()
	if err := h.Void(ctx, ps[:1]); err != nil {
		t.Fatal(err)
	}
	_, after := h.Size()
	if before-after < 10_000 {
		t.Fatalf("Void let %d bytes go of a 10,000-byte body (store total %d → %d)", before-after, before, after)
	}
	h.consistent(t)
	es, _, err := h.Since(ctx, "user:2", "", 0, 0)
	if err != nil || len(es) != 1 || len(es[0].Body) != 10_000 || es[0].Void {
		t.Fatalf("the other stream's entry: %+v, %v", es, err)
	}
}
