package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"imcloud/adapters"
	"imcloud/adapters/redis"
	"imcloud/cmd/imcloud/internal/process"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
)

// cmdPoison inspects and re-drives the poison queue: on a shared broker
// directly, on the embedded one through the running standalone process's
// admin listener, where its poisoned messages live.
func cmdPoison(ctx context.Context, args []string, stdout, stderr io.Writer, environ []string) error {
	var (
		cf    configFlags
		keys  []string
		ids   []string
		all   bool
		admin string
		limit int
		after string
	)
	fs := newFlagSet("poison", `imcloud poison list|replay|purge [--key KEY]... [--id ID]... [--all] [--limit N] [--after KEY] [--config F] [--admin ADDR]
  list     show poisoned messages with their key, id, reason, handler and
           time, oldest first, at most --limit after --after
  replay   re-publish each chosen message to the push shard it was
           poisoned from, or to the first shard when that is not one of
           them (a message from before a change of topics.push_shards)
  purge    drop the chosen messages
Choose messages by --key (the broker's own unique name for each entry, the
KEY column), or by --id (the message id its publisher chose: refused when
one id names more than one entry), or --all.
With broker.kind = gochannel the poisoned messages live in the memory of
the running standalone process: reach them through its admin listener
(--admin, or admin.addr from the configuration).`, stderr)
	cf.register(fs)
	fs.StringSliceVar(&keys, "key", nil, "entry keys to replay or purge, as list shows them (repeatable, or comma-separated)")
	fs.StringSliceVar(&ids, "id", nil, "message ids to replay or purge (repeatable, or comma-separated); refused if one names more than one entry")
	fs.IntVar(&limit, "limit", process.PoisonListDefault, fmt.Sprintf("list: at most this many messages (1 to %d)", process.PoisonListMax))
	fs.StringVar(&after, "after", "", "list: start after the entry with this key (the last key of the previous page)")
	fs.BoolVar(&all, "all", false, "replay or purge every poisoned message")
	fs.StringVar(&admin, "admin", "", "broker.kind gochannel only: the running standalone process's admin listener, host:port (default admin.addr)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("poison: want one of list, replay, purge")
	}
	action := fs.Arg(0)
	switch action {
	case "list", "replay", "purge":
	default:
		return fmt.Errorf("poison: unknown action %q (want list, replay or purge)", action)
	}
	cfg, err := cf.load(environ, nil, "stages=job")
	if err != nil {
		return err
	}
	if action != "list" {
		given := 0
		for _, g := range []bool{all, len(keys) > 0, len(ids) > 0} {
			if g {
				given++
			}
		}
		switch {
		case given > 1:
			return errors.New("poison: give one of --key, --id or --all")
		case given == 0:
			return fmt.Errorf("poison %s: say which messages with --key, --id or --all", action)
		}
	} else if limit < 1 || limit > process.PoisonListMax {
		return fmt.Errorf("poison list: --limit %d: want 1 to %d", limit, process.PoisonListMax)
	}
	// Errors may carry what a publisher wrote (ids, reasons): escaped as
	// the listing is.
	return escapedErr(poison(ctx, cfg, action, poisonArgs{keys: keys, ids: ids, all: all, admin: admin, limit: limit, after: after}, stdout, stderr))
}

// poisonArgs is what the flags of imcloud poison chose.
type poisonArgs struct {
	keys, ids    []string
	all          bool
	admin, after string
	limit        int
}

func poison(ctx context.Context, cfg config.Config, action string, a poisonArgs, stdout, stderr io.Writer) error {
	admin, ids, all := a.admin, a.ids, a.all
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if cfg.Broker.Kind == config.BrokerGoChannel {
		if admin == "" {
			admin = cfg.Admin.Addr
		}
		if admin == "" {
			return fmt.Errorf("broker.kind %q: the embedded broker's poisoned messages live in the memory of the running standalone process; give --admin ADDR, the admin.addr that process listens on", cfg.Broker.Kind)
		}
		return poisonOverAdmin(ctx, admin, action, a, cfg.Topics.PushTopics(), stdout)
	}
	if admin != "" {
		return fmt.Errorf("poison --admin: broker.kind %q is a shared broker, reached directly with the configuration; --admin is for the embedded broker (gochannel) of a standalone process", cfg.Broker.Kind)
	}
	p, err := adapters.OpenPoison(cfg, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		return err
	}
	defer p.Close()
	if action == "list" {
		msgs, more, err := p.List(ctx, a.after, a.limit)
		if err != nil {
			return err
		}
		entries := make([]process.PoisonEntry, 0, len(msgs))
		for _, m := range msgs {
			entries = append(entries, process.PoisonEntryOf(m, false))
		}
		return printPoisonList(stdout, cfg.Topics.Poison, entries, more)
	}
	var sel pipeline.Selector
	switch {
	case all:
		sel = pipeline.All
	case len(a.keys) > 0:
		sel = pipeline.Keys(a.keys...)
	default:
		if sel, err = pipeline.ResolveIDs(ctx, p, ids...); err != nil {
			return err
		}
	}
	switch action {
	case "replay":
		if err := checkShards(ctx, cfg); err != nil {
			return err
		}
		replayed, err := p.Replay(ctx, sel)
		fmt.Fprintln(stdout, replayedLine(replayed, cfg.Topics.PushTopics()))
		return err
	default:
		n, err := p.Purge(ctx, sel)
		fmt.Fprintf(stdout, "purged %d message(s)\n", n)
		return err
	}
}

// replayedLine says how many messages a replay re-published and where:
// "replayed N message(s) to T" when all went to one topic, else the count
// of each, in the order of shards (the push topics in order; any other
// after, by name). A topic is escaped: over the admin listener it comes
// from another process.
func replayedLine(r pipeline.Replayed, shards []string) string {
	var topics []string
	for _, t := range shards {
		if r[t] > 0 {
			topics = append(topics, t)
		}
	}
	for _, t := range slices.Sorted(maps.Keys(r)) {
		if r[t] > 0 && !slices.Contains(shards, t) {
			topics = append(topics, t)
		}
	}
	line := fmt.Sprintf("replayed %d message(s)", r.Total())
	switch len(topics) {
	case 0:
		return line
	case 1:
		return line + " to " + printable(topics[0])
	}
	each := make([]string, 0, len(topics))
	for _, t := range topics {
		each = append(each, fmt.Sprintf("%d to %s", r[t], printable(t)))
	}
	return line + ": " + strings.Join(each, ", ")
}

// printPoisonList prints a page of the list. Every column but the time
// comes from the broker, where any publisher writes it: each is escaped
// and cut (printable).
func printPoisonList(stdout io.Writer, topic string, msgs []process.PoisonEntry, more bool) error {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tID\tPOISONED AT\tHANDLER\tREASON")
	for _, m := range msgs {
		handler, reason := m.Handler, m.Reason
		if m.Undecodable != "" {
			// Not a message: it can only be purged, by this key.
			handler, reason = "-", "UNDECODABLE: "+m.Undecodable
		}
		at := "-"
		if !m.PoisonedAt.IsZero() {
			at = m.PoisonedAt.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", printable(m.Key), printable(m.ID), at, printable(handler), printable(reason))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if _, err := fmt.Fprintf(stdout, "%d poisoned message(s) in %s\n", len(msgs), printable(topic)); err != nil {
		return err
	}
	if more && len(msgs) > 0 {
		_, err := fmt.Fprintf(stdout, "more remain: list on with --after %s\n", printable(msgs[len(msgs)-1].Key))
		return err
	}
	return nil
}

// maxColumn is how many runes of a column printable keeps: a reason is an
// error's text, a few hundred bytes at most when honest.
const maxColumn = 200

// printable is s safe to print in a column of a terminal (escape), cut
// past maxColumn runes, marked so.
func printable(s string) string { return escape(s, maxColumn) }

// escape is s with control characters (escape sequences, and tabs and
// newlines that would forge rows and columns) and format characters
// (bidirectional overrides) escaped as Go escapes them in a quoted
// string, invalid UTF-8 as \xNN and backslashes doubled; past max runes
// (0 for no cap) it is cut, marked "…[cut]".
func escape(s string, max int) string {
	var b strings.Builder
	for n := 0; len(s) > 0; n++ {
		if max > 0 && n == max {
			b.WriteString("…[cut]")
			break
		}
		r, size := utf8.DecodeRuneInString(s)
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[0])
		case r == '\\':
			b.WriteString(`\\`)
		case unicode.IsControl(r) || unicode.Is(unicode.Cf, r):
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteRune(r)
		}
		s = s[size:]
	}
	return b.String()
}

// escapedErr is err with its text escaped (not cut), still wrapping err:
// an error may carry what a publisher wrote.
func escapedErr(err error) error {
	if err == nil {
		return nil
	}
	return escaped{err}
}

type escaped struct{ err error }

func (e escaped) Error() string { return escape(e.err.Error(), 0) }

func (e escaped) Unwrap() error { return e.err }

// poisonOverAdmin runs action on the poison endpoints of the admin
// listener at addr (process/poison.go); shards order what a replay says.
func poisonOverAdmin(ctx context.Context, addr, action string, a poisonArgs, shards []string, stdout io.Writer) error {
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	var req *http.Request
	var err error
	if action == "list" {
		q := url.Values{"limit": {strconv.Itoa(a.limit)}}
		if a.after != "" {
			q.Set("after", a.after)
		}
		req, err = http.NewRequestWithContext(ctx, http.MethodGet, base+process.PoisonPath+"?"+q.Encode(), nil)
	} else {
		var form url.Values
		switch {
		case a.all:
			form = url.Values{"all": {"true"}}
		case len(a.keys) > 0:
			form = url.Values{"key": a.keys}
		default:
			form = url.Values{"id": a.ids}
		}
		path := process.PoisonReplayPath
		if action == "purge" {
			path = process.PoisonPurgePath
		}
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, base+path, strings.NewReader(form.Encode()))
		if req != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
	}
	if err != nil {
		return fmt.Errorf("poison --admin %s: %w", addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("poison: reach the admin listener at %s (is the standalone process running, with admin.addr set to it?): %w", addr, err)
	}
	defer resp.Body.Close()
	// A page of at most PoisonListMax messages is about 2.5 MB of JSON.
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("poison: read the answer of %s: %w", addr, err)
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		return fmt.Errorf("poison: the admin listener at %s answered %s: %s", addr, resp.Status, strings.TrimSpace(string(body)))
	}
	if action == "list" {
		var l process.PoisonList
		if err := json.Unmarshal(body, &l); err != nil {
			return fmt.Errorf("poison: the list from %s: %w", addr, err)
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("poison: the admin listener at %s answered %s", addr, resp.Status)
		}
		return printPoisonList(stdout, l.Topic, l.Messages, l.More)
	}
	var res process.PoisonResult
	if err := json.Unmarshal(body, &res); err != nil {
		return fmt.Errorf("poison: the answer of %s: %w", addr, err)
	}
	if action == "replay" {
		fmt.Fprintln(stdout, replayedLine(res.Replayed, shards))
	} else {
		fmt.Fprintf(stdout, "purged %d message(s)\n", res.Count)
	}
	if res.Error != "" {
		return fmt.Errorf("poison %s: %s", action, res.Error)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("poison %s: the admin listener at %s answered %s", action, addr, resp.Status)
	}
	return nil
}

// checkShards refuses a replay from a configuration whose
// topics.push_shards differs from the one the cluster's processes run
// with (registry.kind redis): its messages would go to queues no job
// reads. With the memory registry there is no cluster to ask.
func checkShards(ctx context.Context, cfg config.Config) error {
	if cfg.Registry.Kind != config.RegistryRedis {
		return nil
	}
	rdb, err := redis.Connect(ctx, cfg.Registry.Redis)
	if err != nil {
		return fmt.Errorf("check topics.push_shards with the cluster: %w", err)
	}
	defer rdb.Close()
	a := redis.NewAgreements(rdb, cfg.Registry.Redis.Prefix)
	value := strconv.Itoa(max(cfg.Topics.PushShards, 1))
	member := fmt.Sprintf("imcloud poison replay/%d", os.Getpid())
	other, err := a.Agree(ctx, pipeline.PushShardsSetting, value, member, 10*time.Second)
	if err != nil {
		return fmt.Errorf("check topics.push_shards with the cluster: %w", err)
	}
	defer func() { _ = a.Leave(context.WithoutCancel(ctx), pipeline.PushShardsSetting, member) }()
	if other != (pipeline.Agreed{}) {
		return fmt.Errorf("topics.push_shards = %s here, but %s runs with %s: replay with the configuration the cluster runs with, or its messages go to queues no job reads", value, other.Member, other.Value)
	}
	return nil
}
