package redis

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

// Void positions. A Redis Stream's entries cannot be rewritten, and
// deleting one (XDEL) would leave a hole the log's readers take for
// trimming: a voided position is written instead in its stream's meta hash
// (field void: the voided positions still kept, in decimal, space
// separated), which Since reads in the same script as the entries and
// which lives and dies with the stream's epoch. The entry's bytes stay in
// the log until trimmed like any other, but are never given again. The
// field holds only kept positions (each Void drops those the log no longer
// holds), so it is bounded by the stream's size: at most HistoryCaps.MaxSize
// numbers. A push is voided only when its publish failed, so it is empty
// but for a broker outage.

// voidScript: KEYS meta, log of each position; ARGV epoch, position of
// each. Returns how many positions were voided now.
var voidScript = goredis.NewScript(historyLua + `
local n = 0
for i = 1, #KEYS / 2 do
  local meta, log = KEYS[2 * i - 1], KEYS[2 * i]
  local want, arg = ARGV[2 * i - 1], ARGV[2 * i]
  local pos = tonumber(arg)
  local m = redis.call('HMGET', meta, 'epoch', 'seq', 'void')
  if m[1] and m[1] == want and pos >= 1 and pos <= tonumber(m[2]) and
      #redis.call('XRANGE', log, arg, arg, 'COUNT', 1) > 0 then
    local first = parse(redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1][1])
    local kept, seen = {}, false
    for p in string.gmatch(m[3] or '', '%d+') do
      local v = tonumber(p)
      if v == pos then seen = true end
      if v >= first then kept[#kept + 1] = p end
    end
    if not seen then
      kept[#kept + 1] = arg
      n = n + 1
    end
    redis.call('HSET', meta, 'void', table.concat(kept, ' '))
  end
end
return n`)

// Void marks the entries at positions as never accepted
// (pipeline.History), in one round trip.
func (h *History) Void(ctx context.Context, positions []pipeline.StreamPos) error {
	if err := pipeline.CheckHistoryPositions(positions); err != nil {
		return fmt.Errorf("history void: %w", err)
	}
	if len(positions) == 0 {
		return nil
	}
	streams := make([]string, len(positions))
	for i, p := range positions {
		streams[i] = p.Stream
	}
	groups := h.streamGroups(streams)
	calls := make([]scriptCall, len(groups))
	for i, g := range groups {
		keys := make([]string, 0, 2*len(g))
		args := make([]any, 0, 2*len(g))
		for _, pi := range g {
			p := positions[pi]
			keys = append(keys, h.metaKey(p.Stream), h.logKey(p.Stream))
			args = append(args, p.Epoch, strconv.FormatUint(p.Pos, 10))
		}
		calls[i] = scriptCall{keys: keys, args: args}
	}
	for _, cmd := range runScripts(ctx, h.rdb, voidScript, calls) {
		if err := cmd.Err(); err != nil {
			return fmt.Errorf("history void %d positions: %w", len(positions), err)
		}
	}
	return nil
}

// markVoid turns the entries whose position is in void (the meta hash's
// field) into void ones: position, id and time only.
func markVoid(entries []pipeline.HistoryEntry, void string) {
	if void == "" {
		return
	}
	set := map[uint64]bool{}
	for _, f := range strings.Fields(void) {
		if p, err := strconv.ParseUint(f, 10, 64); err == nil {
			set[p] = true
		}
	}
	for i, e := range entries {
		if set[e.Pos] {
			entries[i] = pipeline.HistoryEntry{Pos: e.Pos, ID: e.ID, At: e.At, Void: true}
		}
	}
}
