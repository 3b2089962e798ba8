//go:build integration

package redis

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

func TestIntegrationAgreements(t *testing.T) {
	ctx := context.Background()
	rdb := goredis.NewClient(&goredis.Options{Addr: testAddr()})
	t.Cleanup(func() { _ = rdb.Close() })
	prefix := registrytest.Prefix(t)
	a := NewAgreements(rdb, prefix)
	t.Cleanup(func() { rdb.Del(ctx, a.key("shards")) })

	agree := func(value, member string, ttl time.Duration) pipeline.Agreed {
		t.Helper()
		other, err := a.Agree(ctx, "shards", value, member, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return other
	}
	if o := agree("4", "a", time.Minute); o != (pipeline.Agreed{}) {
		t.Fatalf("first member: disagreed with %+v", o)
	}
	if o := agree("4", "b", time.Minute); o != (pipeline.Agreed{}) {
		t.Fatalf("same value: disagreed with %+v", o)
	}
	if o := agree("2", "c", time.Minute); o.Value != "4" || (o.Member != "a" && o.Member != "b") {
		t.Fatalf("other value: got %+v, want a live member with 4", o)
	}
	// c was refused: it is not recorded, so a and b leaving is enough.
	for _, m := range []string{"a", "b"} {
		if err := a.Leave(ctx, "shards", m); err != nil {
			t.Fatal(err)
		}
	}
	if o := agree("2", "c", time.Minute); o != (pipeline.Agreed{}) {
		t.Fatalf("after the others left: disagreed with %+v", o)
	}
	// A renewal keeps one record a member, whatever it ran with before.
	if o := agree("2", "c", time.Minute); o != (pipeline.Agreed{}) {
		t.Fatalf("renewal: disagreed with %+v", o)
	}
	if n := rdb.ZCard(ctx, a.key("shards")).Val(); n != 1 {
		t.Fatalf("after a renewal: %d records, want 1", n)
	}

	// A member that stops renewing lapses: the others may change.
	if o := agree("2", "c", 20*time.Millisecond); o != (pipeline.Agreed{}) {
		t.Fatalf("short ttl: disagreed with %+v", o)
	}
	deadline := time.Now().Add(5 * time.Second)
	for agree("8", "d", time.Minute) != (pipeline.Agreed{}) {
		if time.Now().After(deadline) {
			t.Fatal("a member past its ttl still disagreed after 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A member renewing with a short ttl does not cut the others' short:
	// the set lives as long as its longest-lived member.
	if o := agree("8", "long", time.Minute); o != (pipeline.Agreed{}) {
		t.Fatalf("long: disagreed with %+v", o)
	}
	if o := agree("8", "brief", 100*time.Millisecond); o != (pipeline.Agreed{}) {
		t.Fatalf("brief: disagreed with %+v", o)
	}
	if ttl := rdb.PTTL(ctx, a.key("shards")).Val(); ttl < 50*time.Second {
		t.Fatalf("after a brief member's renewal the set expires in %s, before the long one's minute", ttl)
	}

	// Announce records what each says of itself, with no check against
	// the others, one record a member.
	t.Cleanup(func() { rdb.Del(ctx, a.key("job.shards")) })
	for _, ann := range [][2]string{{"0,1", "j1"}, {"2", "j2"}, {"2,3", "j2"}} {
		if err := a.Announce(ctx, "job.shards", ann[0], ann[1], time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	live, err := a.Live(ctx, "job.shards")
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(live, func(x, y pipeline.Agreed) int { return strings.Compare(x.Member, y.Member) })
	if want := []pipeline.Agreed{{Value: "0,1", Member: "j1"}, {Value: "2,3", Member: "j2"}}; !slices.Equal(live, want) {
		t.Fatalf("live %+v, want %+v", live, want)
	}

	if _, err := a.Agree(ctx, "shards", "4\x00x", "e", time.Minute); err == nil {
		t.Fatal("a value holding NUL was recorded")
	}
}
